package main

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
)

// chunks is how many equal pieces the dataset is hashed in: clone k of N
// hashes pieces (k-1)·8/N .. k·8/N-1, so N must divide it, and the parent
// hashes all of them once to check every clone's result.
const chunks = 8

// cloneScript is a parent's workload: load the dataset into guest memory
// (the rootfs is the initramfs, i.e. guest RAM), then for each N in order
// take a ticket of N, clone, have each clone hash its slice and exit with
// the sums, and join. At the end the parent hashes every chunk itself
// (no cloning involved) and prints "SUMS <8 sums>" for the bench to check
// the clones' results against.
func cloneScript(dataMiB int, order []int) string {
	ns := make([]string, len(order))
	for i, n := range order {
		ns[i] = fmt.Sprint(n)
	}
	return fmt.Sprintf(`C=%d
sfguest gen-data --size %d --seed 1 /data || { echo GEN-FAILED; exit 1; }
echo LOADED
hashchunks() {
  i=$1; R=""
  while [ $i -lt $2 ]; do
    R="$R $(dd if=/data bs=1M skip=$((i*C)) count=$C 2>/dev/null | sha256sum | cut -c1-64)"
    i=$((i+1))
  done
  echo $R
}
for N in %s; do
  T=$(sfguest ticket $N | sed 's/^ticket \([0-9]*\):.*/\1/')
  K=$(sfguest clone $T) || { echo CLONE-FAILED; exit 1; }
  if [ "$K" != 0 ]; then
    P=$((%d/N))
    sfguest exit --status 0 --result "$(hashchunks $(((K-1)*P)) $((K*P)))"
    exit 0
  fi
  sfguest join $T >/dev/null || { echo JOIN-FAILED; exit 1; }
  echo "JOINED $N $T"
  sleep 1
done
echo "SUMS $(hashchunks 0 %d)"
`, dataMiB/chunks, dataMiB, strings.Join(ns, " "), chunks, chunks)
}

// coldScript is a cold-booted VM's workload: load the same dataset, say so
// and power off.
func coldScript(dataMiB int) string {
	return fmt.Sprintf("sfguest gen-data --size %d --seed 1 /data || { echo GEN-FAILED; exit 1; }\necho %s\n",
		dataMiB, loadedMarker)
}

// loadedMarker is the console line that says the dataset is in memory. The
// console also echoes the workload's text, where it follows "echo ".
const loadedMarker = "LOADED"

var (
	sumsLine   = regexp.MustCompile(`(?m)^SUMS((?: [0-9a-f]{64}){8})\r?$`)
	joinedLine = regexp.MustCompile(`(?m)^JOINED \d+ (\d+)\r?$`)
	loadedLine = regexp.MustCompile(`(?m)^` + loadedMarker + `\r?$`)
	failedLine = regexp.MustCompile(`(?m)^sfguest: workload exited with status [1-9]`)
)

// errVerify marks a clone result, ticket or console that is not what the
// workload should have produced.
var errVerify = errors.New("verification failed")

// parseSums returns the chunk sums a parent printed.
func parseSums(console string) ([]string, error) {
	m := sumsLine.FindStringSubmatch(console)
	if m == nil {
		return nil, fmt.Errorf("%w: the parent printed no SUMS line", errVerify)
	}
	return strings.Fields(m[1]), nil
}

// wantResult is what clone k of n must report: the sums of its chunks.
func wantResult(sums []string, k, n int) string {
	per := chunks / n
	return strings.Join(sums[(k-1)*per:k*per], " ")
}

// tail is the end of a console log, for error messages.
func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}
