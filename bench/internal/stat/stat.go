// Package stat has the small statistics the benchmark programs report.
package stat

import (
	"math"
	"slices"
)

// Median of v (which it does not change); 0 for none. With an even count
// it is the mean of the two middle values.
func Median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(v))
	m := len(s) / 2
	if len(s)%2 == 1 {
		return s[m]
	}
	return (s[m-1] + s[m]) / 2
}

// Percentile is the nearest-rank p-th percentile (0 < p <= 100) of sorted
// values; 0 for none.
func Percentile(sorted []int64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return float64(sorted[max(i, 0)])
}
