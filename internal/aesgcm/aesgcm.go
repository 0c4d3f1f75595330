// Package aesgcm builds the AES-256-GCM AEAD that memserver and mcast seal
// guest memory with, from a key each derives its own way.
package aesgcm

import (
	"crypto/aes"
	"crypto/cipher"
	"fmt"
)

// KeySize is the key length New takes: AES-256.
const KeySize = 32

// New returns AES-256-GCM with the standard 12-byte nonce and 16-byte tag.
func New(key []byte) (cipher.AEAD, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("aesgcm: key of %d bytes, want %d", len(key), KeySize)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}
