package xenctl

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// listLine prints one domain the way xl list does (tools/xl/xl_info.c
// list_domains: the header, then "%-40s %5d %5lu %5d     %c%c%c%c%c%c
// %8.1f").
func listLine(name string, id, mem, vcpus int, state string, secs float64) string {
	return "Name                                        ID   Mem VCPUs\tState\tTime(s)\n" +
		fmt.Sprintf("%-40s %5d %5d %5d     %s  %8.1f\n", name, id, mem, vcpus, state, secs)
}

// listLong is what xl list -l prints for a PVH domain made by Create, as
// libxl's generated JSON writes it through yajl's beautifier (4-space
// indent; enums as lowercase strings; default-valued fields omitted;
// the keyed union as "type.pvh").
const listLongPVH = `[
    {
        "domid": 3,
        "config": {
            "c_info": {
                "type": "pvh",
                "name": "sf-parent",
                "uuid": "6f1c8e3a-2d4b-4c55-9a0e-3f2b1c4d5e6f",
                "run_hotplug_scripts": "True"
            },
            "b_info": {
                "max_vcpus": 2,
                "avail_vcpus": [
                    0,
                    1
                ],
                "numa_placement": "True",
                "max_memkb": 262144,
                "target_memkb": 262144,
                "shadow_memkb": 3072,
                "sched_params": {

                },
                "kernel": "/boot/vmlinuz",
                "cmdline": "console=hvc0 quiet",
                "ramdisk": "/boot/initrd.img",
                "type.pvh": {
                    "pvshim": "False"
                },
                "arch_arm": {

                },
                "arch_x86": {
                    "msr_relaxed": "False"
                }
            },
            "on_reboot": "restart",
            "on_watchdog": "destroy",
            "on_crash": "destroy",
            "on_soft_reset": "soft_reset"
        }
    }
]
`

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
	name, info, err := parseList([]byte(listLine("sf-parent", 3, 256, 2, "-b----", 12.5)), 3)
	if err != nil || name != "sf-parent" || info.ID != 3 || info.MemMB != 256 || info.OnlineVCPUs != 2 ||
		!info.State.Blocked || info.CPUSeconds != 12.5 {
		t.Fatalf("%q %+v %v", name, info, err)
	}
	long := strings.Repeat("n", 50) // longer than the column
	if name, _, err := parseList([]byte(listLine(long, 7, 128, 1, "r-----", 0)), 7); err != nil || name != long {
		t.Fatalf("long name: %q, %v", name, err)
	}
	for i, bad := range []string{
		"",
		listLine("a", 3, 256, 1, "-b----", 1)[:60],
		listLine("a", 4, 256, 1, "-b----", 1), // another domain
		listLine("a", 3, 256, 1, "-b-", 1),
		strings.Replace(listLine("a", 3, 256, 1, "-b----", 1), "Name", "Nom", 1),
		listLine("a", 3, 256, 1, "-b----", 1) + listLine("b", 3, 256, 1, "-b----", 1),
		strings.Replace(listLine("a", 3, 256, 1, "-b----", 1), "1.0", "NaN", 1),
	} {
		if _, _, err := parseList([]byte(bad), 3); !errors.Is(err, ErrBadOutput) {
			t.Errorf("#%d: %v", i, err)
		}
	}
}

func TestParseListLong(t *testing.T) {
	info, err := parseListLong([]byte(listLongPVH), 3)
	if err != nil {
		t.Fatal(err)
	}
	want := Info{ID: 3, Name: "sf-parent", UUID: "6f1c8e3a-2d4b-4c55-9a0e-3f2b1c4d5e6f", Type: TypePVH,
		MaxVCPUs: 2, MaxMemKB: 262144, TargetMemKB: 262144, Kernel: "/boot/vmlinuz", Ramdisk: "/boot/initrd.img",
		Cmdline: "console=hvc0 quiet"}
	if info != want {
		t.Fatalf("got %+v\nwant %+v", info, want)
	}
	for i, bad := range []string{
		"[\n]\n", // xl could not read the configuration
		"",
		"{}",
		listLongPVH[:100],
		strings.Replace(listLongPVH, `"domid": 3`, `"domid": 4`, 1),
		strings.Replace(listLongPVH, `"domid": 3`, `"domid": null`, 1),
		strings.Replace(listLongPVH, `"pvh"`, `"pvx"`, 1),
		strings.Replace(listLongPVH, `"name": "sf-parent"`, `"name": ""`, 1),
		strings.Replace(listLongPVH, `"name": "sf-parent"`, `"name": "a\nb"`, 1),
		strings.Replace(listLongPVH, `6f1c8e3a`, `zzzz`, 1),
		strings.Replace(listLongPVH, `"max_memkb": 262144`, `"max_memkb": -1`, 1),
		strings.Replace(listLongPVH, `"max_vcpus": 2`, `"max_vcpus": 100000`, 1),
		"[" + strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(listLongPVH), "["), "]") + "," +
			strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(listLongPVH), "["), "]") + "]",
	} {
		if _, err := parseListLong([]byte(bad), 3); !errors.Is(err, ErrBadOutput) {
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
	f.Add([]byte(listLine("sf-parent", 3, 256, 2, "-b----", 12.5)))
	f.Add([]byte(listLongPVH))
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
