package memserver

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"
)

// BenchmarkFetch measures Fetch over loopback from a snapshot of data pages
// (nothing zero, so every page travels), for batches of 1, 16 and 256
// random pages: one goroutine (latency), and 8 goroutines sharing the
// client (pipelining). It reports pages/s and the p50 and p99 latency of a
// Fetch.
func BenchmarkFetch(b *testing.B) {
	const pages = 16384 // 64 MiB
	dir := shmDir(b)
	if dir == "" {
		dir = b.TempDir()
	}
	sf := writeDataSnapshot(b, dir, pages)
	s := startServer(b, Config{})
	c := dial(b, ClientConfig{}, s, "bench", register(b, s, "bench", sf))
	for _, batch := range []int{1, 16, 256} {
		for _, par := range []int{1, 8} {
			b.Run(fmt.Sprintf("batch=%d/goroutines=%d", batch, par), func(b *testing.B) {
				b.SetBytes(int64(batch * PageSize))
				var mu sync.Mutex
				lat := make([]time.Duration, 0, b.N)
				var wg sync.WaitGroup
				b.ResetTimer()
				start := time.Now()
				for g := range par {
					wg.Add(1)
					go func() {
						defer wg.Done()
						r := rand.New(rand.NewPCG(uint64(g), uint64(batch)))
						req := make([]uint64, batch)
						var mine []time.Duration
						for i := g; i < b.N; i += par {
							for j := range req {
								req[j] = uint64(r.IntN(pages))
							}
							t0 := time.Now()
							if _, err := c.Fetch(context.Background(), req); err != nil {
								b.Error(err)
								return
							}
							mine = append(mine, time.Since(t0))
						}
						mu.Lock()
						lat = append(lat, mine...)
						mu.Unlock()
					}()
				}
				wg.Wait()
				elapsed := time.Since(start)
				b.StopTimer()
				slices.Sort(lat)
				if len(lat) > 0 {
					b.ReportMetric(float64(b.N*batch)/elapsed.Seconds(), "pages/s")
					b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
					b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
				}
			})
		}
	}
}

// writeDataSnapshot writes a file of random data pages.
func writeDataSnapshot(b *testing.B, dir string, pages int) snapFile {
	sf := snapFile{path: filepath.Join(dir, "ram"), pages: pages, content: make([]byte, pages*PageSize), kinds: make([]int, pages)}
	r := rand.New(rand.NewPCG(1, 1))
	for i := range sf.content {
		sf.content[i] = byte(r.Uint32() | 1)
	}
	for i := range sf.kinds {
		sf.kinds[i] = pageData
	}
	if err := os.WriteFile(sf.path, sf.content, 0o600); err != nil {
		b.Fatal(err)
	}
	return sf
}
