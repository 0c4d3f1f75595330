package api

import (
	"crypto/sha256"
	"crypto/subtle"
	"strings"
)

// TokenMatches reports whether an Authorization header carries the bearer
// token want. The comparison takes the same time whatever the header holds
// (both sides are hashed first, so not even the length leaks).
func TokenMatches(header, want string) bool {
	got, ok := strings.CutPrefix(header, "Bearer ")
	g, w := sha256.Sum256([]byte(got)), sha256.Sum256([]byte(want))
	return subtle.ConstantTimeCompare(g[:], w[:]) == 1 && ok
}
