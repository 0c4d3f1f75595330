// Command snapinit is the /init of the guest that the snapshot tests boot
// and clone. It fills memory with a pattern and then ticks forever, so that
// a test can tell from the console (ttyS0) that a VM keeps running, that a
// clone continues where its parent was snapshotted, and that the memory it
// restored is the parent's.
//
// At boot it picks a boot ID, touches snap_touch_mb MiB (a kernel command
// line parameter, which the kernel hands to init as an environment
// variable) and writes eight pattern words, derived from the boot ID, into
// every page. Every tick (100 ms) it increments a counter, checks one of the
// eight words of every page, rewrites a scratch area (so that the guest
// keeps writing RAM) and prints
//
//	snapinit: boot=<id> tick=<n> bad=<pages whose word was wrong>
//
// A clone prints the same boot ID as its parent, continues the counter, and
// reports bad=0 only if it sees the parent's memory.
package main

import (
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"time"
)

const (
	pageSize     = 4096
	wordsPerPage = 8
	scratchSize  = 4 << 20
	tickEvery    = 100 * time.Millisecond
)

func main() {
	mb, err := strconv.Atoi(os.Getenv("snap_touch_mb"))
	if err != nil || mb <= 0 {
		mb = 16
	}
	boot := uint64(time.Now().UnixNano())*0x9E3779B97F4A7C15 | 1
	fmt.Printf("snapinit: up boot=%016x touch_mb=%d\n", boot, mb)

	start := time.Now()
	mem := make([]byte, mb<<20)
	pages := len(mem) / pageSize
	for p := range pages {
		for k := range wordsPerPage {
			binary.LittleEndian.PutUint64(mem[p*pageSize+k*pageSize/wordsPerPage:], pattern(boot, p, k))
		}
	}
	scratch := make([]byte, scratchSize)
	fmt.Printf("snapinit: filled %d MiB in %d ms\n", mb, time.Since(start).Milliseconds())

	for tick := uint64(1); ; tick++ {
		k := int(tick % wordsPerPage)
		bad := 0
		for p := range pages {
			if binary.LittleEndian.Uint64(mem[p*pageSize+k*pageSize/wordsPerPage:]) != pattern(boot, p, k) {
				bad++
			}
		}
		for off := 0; off < len(scratch); off += pageSize {
			binary.LittleEndian.PutUint64(scratch[off:], tick)
		}
		fmt.Printf("snapinit: boot=%016x tick=%d bad=%d\n", boot, tick, bad)
		time.Sleep(tickEvery)
	}
}

func pattern(boot uint64, page, word int) uint64 {
	return boot ^ uint64(page*wordsPerPage+word)*0xBF58476D1CE4E5B9
}
