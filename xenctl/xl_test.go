package xenctl

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// Real xl output, from Xen 4.17 in the nested test bed (realxen_test.go
// writes them with -update): a 128 MiB PVH domain named "life", domain 1,
// made by Create with a NIC, and paused.
var (
	listLongPVH   = fixture("list-l-pvh.json")
	listPaused    = fixture("list-paused.txt")
	listVerbPause = fixture("list-v-paused.txt")
	// savedConfigPVH is the configuration in the header of a real xl save
	// (Capture) of a 128 MiB PVH domain named "parent", with a NIC.
	savedConfigPVH = fixture("saved-config-pvh.json")
)

func fixture(name string) string {
	b, err := os.ReadFile(filepath.Join("testdata", "xl", name))
	if err != nil {
		panic(err)
	}
	return string(b)
}

// listLine prints one domain the way xl list does (tools/xl/xl_info.c
// list_domains: the header, then "%-40s %5d %5lu %5d     %c%c%c%c%c%c
// %8.1f"), for the fake xl; TestListLineIsXL holds it to real output.
func listLine(name string, id, mem, vcpus int, state string, secs float64) string {
	return "Name                                        ID   Mem VCPUs\tState\tTime(s)\n" +
		fmt.Sprintf("%-40s %5d %5d %5d     %s  %8.1f\n", name, id, mem, vcpus, state, secs)
}

// listVerbose prints one domain the way xl list -v does: the line of
// listLine, then the UUID, the shutdown reason and the security label.
func listVerbose(name string, id, mem, vcpus int, state string, secs float64, uuid string) string {
	out := strings.Replace(listLine(name, id, mem, vcpus, state, secs), "Time(s)",
		"Time(s)   UUID                            Reason-Code\tSecurity Label", 1)
	return strings.TrimSuffix(out, "\n") + fmt.Sprintf(" %s %8s %16s\n", uuid, "-", "-")
}

// fixtureField is field i of the domain's line in an xl list fixture;
// the CPU time (field 5) and UUID (field 6) differ from run to run.
func fixtureField(out string, i int) string {
	return strings.Fields(strings.Split(out, "\n")[1])[i]
}

func fixtureSeconds() float64 {
	secs, err := strconv.ParseFloat(fixtureField(listPaused, 5), 64)
	if err != nil {
		panic(err)
	}
	return secs
}

func TestListLineIsXL(t *testing.T) {
	secs := fixtureSeconds()
	if got := listLine("life", 1, 128, 1, "--p---", secs); got != listPaused {
		t.Errorf("listLine:\n%q\nxl list:\n%q", got, listPaused)
	}
	uuid := fixtureField(listVerbPause, 6)
	if got := listVerbose("life", 1, 128, 1, "--p---", fixtureSeconds(), uuid); got != listVerbPause {
		t.Errorf("listVerbose:\n%q\nxl list -v:\n%q", got, listVerbPause)
	}
}

func TestParseDomid(t *testing.T) {
	tests := []struct {
		out string
		id  uint32
		ok  bool
	}{
		{"3\n", 3, true}, {"0\n", 0, true}, {"32751\n", 32751, true},
		{"32752\n", 0, false}, {"3", 0, false}, {"03\n", 0, false}, {"\n", 0, false},
		{"-1\n", 0, false}, {"3\n4\n", 0, false}, {" 3\n", 0, false}, {"123456\n", 0, false},
	}
	for i, tt := range tests {
		id, err := parseDomid([]byte(tt.out))
		if (err == nil) != tt.ok || id != tt.id {
			t.Errorf("#%d %q: %d, %v", i, tt.out, id, err)
		}
		if err != nil && !errors.Is(err, ErrBadOutput) {
			t.Errorf("#%d: %v is not ErrBadOutput", i, err)
		}
	}
}

func TestParseState(t *testing.T) {
	tests := []struct {
		s    string
		want State
		ok   bool
	}{
		{"r-----", State{Running: true, Reason: '-'}, true},
		{"-b----", State{Blocked: true, Reason: '-'}, true},
		{"--p---", State{Paused: true, Reason: '-'}, true},
		{"---s--", State{Shutdown: true, Reason: '-'}, true}, // powered off
		{"---sc-", State{Shutdown: true, Reason: 'c'}, true},
		{"---sr-", State{Shutdown: true, Reason: 'r'}, true},
		{"-bp---", State{Blocked: true, Paused: true, Reason: '-'}, true}, // real xl, a paused idle guest
		{"-bps-d", State{Blocked: true, Paused: true, Shutdown: true, Reason: '-', Dying: true}, true},
		{"------", State{Reason: '-'}, true},
		{"rb----x", State{}, false},
		{"b-----", State{}, false},
		{"---sx-", State{}, false},
		{"", State{}, false},
	}
	for i, tt := range tests {
		st, err := parseState(tt.s)
		if (err == nil) != tt.ok || st != tt.want {
			t.Errorf("#%d %q: %+v, %v", i, tt.s, st, err)
		}
		if tt.ok && st.String() != tt.s {
			t.Errorf("#%d: %+v prints %q", i, st, st.String())
		}
	}
}

func TestParseList(t *testing.T) {
	name, info, err := parseList([]byte(listPaused), 1)
	if err != nil || name != "life" || info.ID != 1 || info.MemMB != 128 || info.OnlineVCPUs != 1 ||
		info.State != (State{Paused: true, Reason: '-'}) || info.CPUSeconds != fixtureSeconds() {
		t.Fatalf("%q %+v %v", name, info, err)
	}
	long := strings.Repeat("n", 50) // longer than the column
	if name, _, err := parseList([]byte(listLine(long, 7, 128, 1, "r-----", 0)), 7); err != nil || name != long {
		t.Fatalf("long name: %q, %v", name, err)
	}
	// xl list -v's extra columns are not xl list's.
	if _, _, err := parseList([]byte(listVerbPause), 1); !errors.Is(err, ErrBadOutput) {
		t.Errorf("xl list -v: %v", err)
	}
	for i, bad := range []string{
		"",
		listPaused[:60],
		strings.Replace(listPaused, "   1   128", "   4   128", 1), // another domain
		strings.Replace(listPaused, "--p---", "--p", 1),
		strings.Replace(listPaused, "Name", "Nom", 1),
		listPaused + strings.SplitAfter(listPaused, "\n")[1],
		strings.Replace(listPaused, fixtureField(listPaused, 5), "NaN", 1),
	} {
		if _, _, err := parseList([]byte(bad), 1); !errors.Is(err, ErrBadOutput) {
			t.Errorf("#%d: %v", i, err)
		}
	}
}

func TestParseListLong(t *testing.T) {
	info, err := parseListLong([]byte(listLongPVH), 1)
	if err != nil {
		t.Fatal(err)
	}
	uuid := fixtureField(listVerbPause, 6)
	want := Info{ID: 1, Name: "life", UUID: uuid, Type: TypePVH, MaxVCPUs: 1, MaxMemKB: 131072, TargetMemKB: 131072,
		Kernel: "/guest/vmlinux", Ramdisk: "/guest/initrd.cpio", Cmdline: "console=hvc0", MACs: info.MACs}
	if !reflect.DeepEqual(info, want) || len(info.MACs) != 1 || !macPattern.MatchString(info.MACs[0]) {
		t.Fatalf("got %+v\nwant %+v", info, want)
	}
	mac := info.MACs[0]
	one := strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(listLongPVH), "["), "]")
	for i, bad := range []string{
		"[\n]\n", // xl could not read the configuration
		"",
		"{}",
		listLongPVH[:100],
		strings.Replace(listLongPVH, `"domid": 1`, `"domid": 4`, 1),
		strings.Replace(listLongPVH, `"domid": 1`, `"domid": null`, 1),
		strings.Replace(listLongPVH, `"pvh"`, `"pvx"`, 1),
		strings.Replace(listLongPVH, `"name": "life"`, `"name": ""`, 1),
		strings.Replace(listLongPVH, `"name": "life"`, `"name": "a\nb"`, 1),
		strings.Replace(listLongPVH, uuid, "zzzz", 1),
		strings.Replace(listLongPVH, `"max_memkb": 131072`, `"max_memkb": -1`, 1),
		strings.Replace(listLongPVH, `"max_vcpus": 1`, `"max_vcpus": 100000`, 1),
		strings.Replace(listLongPVH, mac, "00:16:3e:zz:00:00", 1),
		"[" + one + "," + one + "]",
	} {
		if _, err := parseListLong([]byte(bad), 1); !errors.Is(err, ErrBadOutput) {
			t.Errorf("#%d: %v", i, err)
		}
	}
}

// FuzzParseXLOutput: no xl output, however odd, makes a parser panic,
// and what they accept is consistent.
//
//	go test -run '^$' -fuzz '^FuzzParseXLOutput$' -fuzztime=20s -fuzzminimizetime=200x ./xenctl
func FuzzParseXLOutput(f *testing.F) {
	f.Add([]byte("3\n"))
	f.Add([]byte(listPaused))
	f.Add([]byte(strings.Replace(listPaused, "   1   128", "   3   128", 1)))
	f.Add([]byte(strings.Replace(listLongPVH, `"domid": 1`, `"domid": 3`, 1)))
	f.Add([]byte("[]"))
	f.Fuzz(func(t *testing.T, out []byte) {
		if id, err := parseDomid(out); err == nil {
			if id > domidMax || string(out) != fmt.Sprintf("%d\n", id) {
				t.Fatalf("domid %d from %q", id, out)
			}
		}
		if st, err := parseState(string(out)); err == nil && st.String() != string(out) {
			t.Fatalf("state %q prints %q", out, st.String())
		}
		if _, info, err := parseList(out, 3); err == nil && info.ID != 3 {
			t.Fatalf("xl list gave domain %d", info.ID)
		}
		if info, err := parseListLong(out, 3); err == nil {
			if info.ID != 3 || info.Name == "" || checkText("name", info.Name) != nil {
				t.Fatalf("xl list -l gave %+v", info)
			}
		}
		if config, err := parseSaveHeader(out); err == nil {
			if back := buildSaveHeader(config); len(back) > len(out) {
				t.Fatalf("save header %q rebuilds longer: %q", out, back)
			}
		}
	})
}
