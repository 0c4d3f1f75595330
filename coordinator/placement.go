package coordinator

import "github.com/snowflock-go/snowflock/fsm"

// place chooses hosts for up to n clones: each clone goes to the host with
// the most free slots left, ties broken by fewer clones of this ticket and
// then by host ID, so a ticket spreads over hosts the way SnowFlock spread
// clones over physical machines. It returns fewer than n hosts when capacity
// runs out (a partial grant) and none when there is no capacity at all.
// It runs on the leader before proposing; the FSM validates the result.
func place(hosts []fsm.Host, n int) []string {
	free := make([]int, len(hosts))
	used := make([]int, len(hosts))
	for i := range hosts {
		free[i] = hosts[i].FreeSlots()
	}
	var out []string
	for len(out) < n {
		best := -1
		for i := range hosts {
			if free[i] == 0 {
				continue
			}
			if best < 0 || free[i] > free[best] || (free[i] == free[best] && used[i] < used[best]) {
				best = i // hosts are sorted by ID, so the first best wins ties
			}
		}
		if best < 0 {
			break
		}
		out = append(out, hosts[best].ID)
		free[best]--
		used[best]++
	}
	return out
}

// placeVM picks the alive host with the most memory left for a VM of memMB
// (offered memory less that of its VMs that have not ended), or "".
func (s *Server) placeVM(memMB int64) string {
	hosts, _ := s.fsm.Hosts()
	vms, _ := s.fsm.VMs("")
	used := map[string]int64{}
	for _, vm := range vms {
		if vm.State != fsm.VMEnded {
			used[vm.Host] += vm.MemMB
		}
	}
	best, bestFree := "", int64(-1)
	for _, h := range hosts {
		free := h.MemMB - used[h.ID]
		if h.Status == fsm.HostAlive && free >= memMB && free > bestFree {
			best, bestFree = h.ID, free
		}
	}
	return best
}
