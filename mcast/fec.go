package mcast

import "crypto/subtle"

// Forward error correction: a systematic Reed-Solomon (MDS) erasure code
// over GF(2^8), as NORM (RFC 5740) uses for its repairs. An object's
// fragments are grouped in blocks of K (the last block may be shorter);
// parity symbol j of a block (0 <= j < 256-K) is
//
//	P_j = sum over the block's fragments i of C[j][i] * D_i
//
// with C[j][i] = (x_0 + y_i) / (x_j + y_i), x_j = K + j, y_i = i:
// a Cauchy matrix whose columns are scaled so that parity 0 is the plain
// XOR of the block. Fragments are zero-padded to the block's first
// (longest) fragment. Every square submatrix of a Cauchy matrix is
// invertible, and scaling columns keeps it so, so any m parity
// symbols of a block recover any m of its missing fragments: one parity
// packet repairs a different lost fragment at every member, and a block
// costs the sender the largest number of fragments any one member misses
// in it.

// gfPoly is the field's reduction polynomial, x^8+x^4+x^3+x^2+1.
const gfPoly = 0x11d

var (
	gfExp [512]byte
	gfLog [256]byte
	gfMul [256][256]byte
)

func init() {
	x := 1
	for i := range 255 {
		gfExp[i] = byte(x)
		gfLog[x] = byte(i)
		x <<= 1
		if x&0x100 != 0 {
			x ^= gfPoly
		}
	}
	for i := 255; i < len(gfExp); i++ {
		gfExp[i] = gfExp[i-255]
	}
	for a := 1; a < 256; a++ {
		for b := 1; b < 256; b++ {
			gfMul[a][b] = gfExp[int(gfLog[a])+int(gfLog[b])]
		}
	}
}

// gfInv is the multiplicative inverse of a non-zero a.
func gfInv(a byte) byte { return gfExp[255-int(gfLog[a])] }

// maxParity is how many distinct parity symbols a block of K has.
func maxParity(k int) int { return 256 - k }

// parityCoef is C[j][i] for blocks of k.
func parityCoef(k, j, i int) byte {
	return gfMul[gfInv(byte(k+j)^byte(i))][byte(k)^byte(i)]
}

// mulAdd adds c*src to dst, over the length of src (dst is at least as
// long).
func mulAdd(dst, src []byte, c byte) {
	dst = dst[:len(src)]
	switch c {
	case 0:
		return
	case 1:
		subtle.XORBytes(dst, dst, src)
		return
	}
	row := &gfMul[c]
	i := 0
	for ; i+8 <= len(src); i += 8 {
		s, d := src[i:i+8:i+8], dst[i:i+8:i+8]
		d[0] ^= row[s[0]]
		d[1] ^= row[s[1]]
		d[2] ^= row[s[2]]
		d[3] ^= row[s[3]]
		d[4] ^= row[s[4]]
		d[5] ^= row[s[5]]
		d[6] ^= row[s[6]]
		d[7] ^= row[s[7]]
	}
	for ; i < len(src); i++ {
		dst[i] ^= row[src[i]]
	}
}

// mulSlice sets dst to c*dst.
func mulSlice(dst []byte, c byte) {
	if c == 1 {
		return
	}
	row := &gfMul[c]
	for i, v := range dst {
		dst[i] = row[v]
	}
}

// encodeParity appends parity symbol j of a block of k whose fragments
// are frags (each at most size bytes) to dst, size bytes long.
func encodeParity(dst []byte, k, j, size int, frags [][]byte) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, size)...)
	p := dst[start:]
	for i, f := range frags {
		mulAdd(p, f, parityCoef(k, j, i))
	}
	return dst
}

// invertMatrix inverts the n x n matrix m (row-major) in place by
// Gauss-Jordan elimination; it reports false if m is singular.
func invertMatrix(m []byte, n int) bool {
	inv := make([]byte, n*n)
	for i := range n {
		inv[i*n+i] = 1
	}
	for col := range n {
		piv := -1
		for r := col; r < n; r++ {
			if m[r*n+col] != 0 {
				piv = r
				break
			}
		}
		if piv < 0 {
			return false
		}
		if piv != col {
			for c := range n {
				m[piv*n+c], m[col*n+c] = m[col*n+c], m[piv*n+c]
				inv[piv*n+c], inv[col*n+c] = inv[col*n+c], inv[piv*n+c]
			}
		}
		if p := m[col*n+col]; p != 1 {
			ip := gfInv(p)
			mulSlice(m[col*n:col*n+n], ip)
			mulSlice(inv[col*n:col*n+n], ip)
		}
		for r := range n {
			if f := m[r*n+col]; r != col && f != 0 {
				mulAdd(m[r*n:r*n+n], m[col*n:col*n+n], f)
				mulAdd(inv[r*n:r*n+n], inv[col*n:col*n+n], f)
			}
		}
	}
	copy(m, inv)
	return true
}

// decodeBlock recovers the missing fragments of a block of k (a block's
// fragments, indexed within the block; nil where missing) from parity
// symbols (indices idx, payloads par, each size bytes): at least as many
// as are missing. It returns the recovered fragments, size bytes each, in
// the order of the missing indices, and false if it cannot.
func decodeBlock(k int, frags [][]byte, idx []int, par [][]byte, size int) ([]int, [][]byte, bool) {
	var miss []int
	for i, f := range frags {
		if f == nil {
			miss = append(miss, i)
		}
	}
	m := len(miss)
	if m == 0 || len(idx) < m {
		return nil, nil, false
	}
	// s_r = P_r - sum of the known fragments' terms = sum over missing e of C[r][e] D_e
	syn := make([][]byte, m)
	a := make([]byte, m*m)
	for r := range m {
		s := make([]byte, size)
		copy(s, par[r])
		for i, f := range frags {
			if f != nil {
				mulAdd(s, f, parityCoef(k, idx[r], i))
			}
		}
		syn[r] = s
		for c, e := range miss {
			a[r*m+c] = parityCoef(k, idx[r], e)
		}
	}
	if !invertMatrix(a, m) {
		return nil, nil, false
	}
	out := make([][]byte, m)
	for c := range m {
		d := make([]byte, size)
		for r := range m {
			mulAdd(d, syn[r], a[c*m+r])
		}
		out[c] = d
	}
	return miss, out, true
}
