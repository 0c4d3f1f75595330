package fsm

import (
	"crypto/sha256"
	"encoding/hex"
)

// Fingerprint is a digest of the replicated state, leaving out the applied
// index: replicas that applied the same commands have the same fingerprint,
// and a refused command (which still takes a log entry) leaves it unchanged.
func (f *FSM) Fingerprint() string {
	f.mu.RLock()
	st := f.st.clone()
	f.mu.RUnlock()
	st.index = 0
	h := sha256.New()
	if err := st.write(h); err != nil {
		panic("fsm: fingerprint: " + err.Error()) // hashing cannot fail to write
	}
	return hex.EncodeToString(h.Sum(nil))
}
