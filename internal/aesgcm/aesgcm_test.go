package aesgcm

import (
	"bytes"
	"testing"
)

func TestNew(t *testing.T) {
	for _, n := range []int{0, 16, 31, 33} {
		if _, err := New(make([]byte, n)); err == nil {
			t.Errorf("a %d-byte key was accepted", n)
		}
	}
	a, err := New(bytes.Repeat([]byte{7}, KeySize))
	if err != nil {
		t.Fatal(err)
	}
	nonce := make([]byte, a.NonceSize())
	sealed := a.Seal(nil, nonce, []byte("page"), []byte("hdr"))
	if a.NonceSize() != 12 || a.Overhead() != 16 {
		t.Fatalf("nonce %d, overhead %d", a.NonceSize(), a.Overhead())
	}
	if got, err := a.Open(nil, nonce, sealed, []byte("hdr")); err != nil || string(got) != "page" {
		t.Fatalf("open: %q %v", got, err)
	}
	if _, err := a.Open(nil, nonce, sealed, []byte("other")); err == nil {
		t.Fatal("opened with other additional data")
	}
}
