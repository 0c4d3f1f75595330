package xenctl

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// xl's save-file header (tools/xl/xl.h struct save_file_header): 32 bytes
// of magic, then byte order, mandatory flags, optional flags and the
// length of the optional data, as uint32 in the saving host's byte order
// (little endian on x86; xl refuses the other). The optional data is a
// uint32 length and the domain's configuration, JSON when the mandatory
// flag says so, nul-terminated.
const (
	saveHeaderSize    = 48
	saveByteOrder     = 0x01020304
	saveFlagJSON      = 1 << 0
	saveFlagStreamV2  = 1 << 1
	saveFlagsKnown    = saveFlagJSON | saveFlagStreamV2
	maxSavedConfig    = 16 << 20
	saveOptionalFlags = 0
)

var saveMagic = []byte("Xen saved domain, xl format\n \x00 \r")

// ErrBadSaveFile is wrapped by errors about an xl save-file header that
// xenctl cannot use.
var ErrBadSaveFile = errors.New("xenctl: bad xl save file")

// ErrMismatch is returned when a restore's Config contradicts the saved
// domain's configuration.
var ErrMismatch = errors.New("xenctl: config does not match the saved domain")

// Saved is what a save image's configuration says of the domain.
type Saved struct {
	Name     string `json:"name"`
	Type     Type   `json:"type"`
	MaxMemKB uint64 `json:"max_memkb"`
	MaxVCPUs int    `json:"max_vcpus"`
}

// savedConfig is the subset of libxl's domain configuration JSON that
// Saved reads.
type savedConfig struct {
	CInfo struct {
		Type string `json:"type"`
		Name string `json:"name"`
	} `json:"c_info"`
	BInfo struct {
		MaxVCPUs int    `json:"max_vcpus"`
		MaxMemKB uint64 `json:"max_memkb"`
	} `json:"b_info"`
}

// parseSaveHeader checks an xl save-file header with its optional data
// and returns the configuration JSON (without its nul).
func parseSaveHeader(b []byte) (config []byte, err error) {
	if len(b) < saveHeaderSize || !bytes.Equal(b[:32], saveMagic) {
		return nil, fmt.Errorf("%w: no xl save-file header", ErrBadSaveFile)
	}
	le := binary.LittleEndian
	if le.Uint32(b[32:]) != saveByteOrder {
		return nil, fmt.Errorf("%w: byte order %#x", ErrBadSaveFile, le.Uint32(b[32:]))
	}
	mandatory, optional := le.Uint32(b[36:]), le.Uint32(b[40:])
	if mandatory&^saveFlagsKnown != 0 || mandatory&saveFlagStreamV2 == 0 || mandatory&saveFlagJSON == 0 {
		return nil, fmt.Errorf("%w: mandatory flags %#x: want a v2 stream with a JSON configuration", ErrBadSaveFile, mandatory)
	}
	if optional != 0 {
		return nil, fmt.Errorf("%w: optional flags %#x", ErrBadSaveFile, optional)
	}
	opt := b[saveHeaderSize:]
	if uint64(le.Uint32(b[44:])) != uint64(len(opt)) || len(opt) < 4 {
		return nil, fmt.Errorf("%w: optional data of %d bytes, header says %d", ErrBadSaveFile, len(opt), le.Uint32(b[44:]))
	}
	n := le.Uint32(opt)
	if uint64(n) > uint64(len(opt)-4) || n < 2 || opt[4+n-1] != 0 {
		return nil, fmt.Errorf("%w: configuration of %d bytes in %d, or not nul-terminated", ErrBadSaveFile, n, len(opt)-4)
	}
	config = opt[4 : 4+n-1]
	if bytes.IndexByte(config, 0) >= 0 {
		return nil, fmt.Errorf("%w: nul inside the configuration", ErrBadSaveFile)
	}
	return config, nil
}

// buildSaveHeader writes a save-file header around a JSON configuration,
// as xl save does.
func buildSaveHeader(config []byte) []byte {
	le := binary.LittleEndian
	b := append([]byte(nil), saveMagic...)
	b = le.AppendUint32(b, saveByteOrder)
	b = le.AppendUint32(b, saveFlagJSON|saveFlagStreamV2)
	b = le.AppendUint32(b, saveOptionalFlags)
	b = le.AppendUint32(b, uint32(4+len(config)+1))
	b = le.AppendUint32(b, uint32(len(config)+1))
	b = append(b, config...)
	return append(b, 0)
}

// readSaved parses the configuration of a save-file header.
func readSaved(header []byte) (Saved, error) {
	config, err := parseSaveHeader(header)
	if err != nil {
		return Saved{}, err
	}
	return savedOf(config)
}

func savedOf(config []byte) (Saved, error) {
	var c savedConfig
	if err := json.Unmarshal(config, &c); err != nil {
		return Saved{}, fmt.Errorf("%w: configuration: %v", ErrBadSaveFile, err)
	}
	return Saved{Name: c.CInfo.Name, Type: Type(c.CInfo.Type), MaxMemKB: c.BInfo.MaxMemKB, MaxVCPUs: c.BInfo.MaxVCPUs}, nil
}

// renameSaveHeader returns header with the configuration's domain name
// replaced, a new UUID and no domain ID, so that the image restores as a
// new domain beside the one it was saved from (libxl refuses a second
// domain of the same name; the saved UUID is the parent's). Unless
// keepMACs, every NIC gets a new MAC address too: the saved ones are the
// parent's, and Linux's netfront takes the address xenstore gives it when
// it reconnects after the restore. Everything else of the configuration
// — devices, memory, vCPUs — stays the parent's, which the image's state
// needs. It also returns the saved configuration's summary and the new
// UUID.
func renameSaveHeader(header []byte, name string, keepMACs bool) ([]byte, Saved, string, error) {
	config, err := parseSaveHeader(header)
	if err != nil {
		return nil, Saved{}, "", err
	}
	saved, err := savedOf(config)
	if err != nil {
		return nil, Saved{}, "", err
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(config, &top); err != nil {
		return nil, Saved{}, "", fmt.Errorf("%w: configuration: %v", ErrBadSaveFile, err)
	}
	var cinfo map[string]json.RawMessage
	if err := json.Unmarshal(top["c_info"], &cinfo); err != nil || cinfo == nil {
		return nil, Saved{}, "", fmt.Errorf("%w: configuration without c_info", ErrBadSaveFile)
	}
	uuid, err := newUUID()
	if err != nil {
		return nil, Saved{}, "", err
	}
	cinfo["name"], _ = json.Marshal(name)
	cinfo["uuid"], _ = json.Marshal(uuid)
	delete(cinfo, "domid")
	if top["c_info"], err = json.Marshal(cinfo); err != nil {
		return nil, Saved{}, "", err
	}
	if raw, ok := top["nics"]; ok && !keepMACs {
		var nics []map[string]json.RawMessage
		if err := json.Unmarshal(raw, &nics); err != nil {
			return nil, Saved{}, "", fmt.Errorf("%w: configuration's nics: %v", ErrBadSaveFile, err)
		}
		for _, nic := range nics {
			mac, err := newMAC()
			if err != nil {
				return nil, Saved{}, "", err
			}
			nic["mac"], _ = json.Marshal(mac)
		}
		if top["nics"], err = json.Marshal(nics); err != nil {
			return nil, Saved{}, "", err
		}
	}
	out, err := json.Marshal(top)
	if err != nil {
		return nil, Saved{}, "", err
	}
	return buildSaveHeader(out), saved, uuid, nil
}

// newMAC returns a random MAC address in Xen's OUI, 00:16:3e, with the
// top bit of the rest clear, as libxl makes them (libxl_nic.c,
// libxl__device_nic_setdefault).
func newMAC() (string, error) {
	var r [3]byte
	if _, err := rand.Read(r[:]); err != nil {
		return "", err
	}
	return fmt.Sprintf("00:16:3e:%02x:%02x:%02x", r[0]&0x7f, r[1], r[2]), nil
}

// readSaveHeader reads an xl save-file header and its optional data from
// the start of an image.
func readSaveHeader(r io.Reader) ([]byte, error) {
	h := make([]byte, saveHeaderSize)
	if _, err := io.ReadFull(r, h); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadSaveFile, err)
	}
	if !bytes.Equal(h[:32], saveMagic) {
		return nil, fmt.Errorf("%w: no xl save-file header", ErrBadSaveFile)
	}
	n := binary.LittleEndian.Uint32(h[44:])
	if n > maxSavedConfig {
		return nil, fmt.Errorf("%w: %d bytes of optional data", ErrBadSaveFile, n)
	}
	opt := make([]byte, n)
	if _, err := io.ReadFull(r, opt); err != nil {
		return nil, fmt.Errorf("%w: optional data: %v", ErrBadSaveFile, err)
	}
	return append(h, opt...), nil
}

// newUUID returns a random (version 4) UUID.
func newUUID() (string, error) {
	var u [16]byte
	if _, err := rand.Read(u[:]); err != nil {
		return "", err
	}
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16]), nil
}

// checkSaved compares the guest settings a restore's Config states (zero
// means "as saved") with the saved configuration.
func checkSaved(cfg Config, s Saved) error {
	if cfg.Type != "" && cfg.Type != s.Type {
		return fmt.Errorf("%w: type %q, saved %q", ErrMismatch, cfg.Type, s.Type)
	}
	if cfg.MemMB != 0 && uint64(cfg.MemMB)*1024 != s.MaxMemKB {
		return fmt.Errorf("%w: %d MiB, saved max_memkb %d", ErrMismatch, cfg.MemMB, s.MaxMemKB)
	}
	if cfg.VCPUs != 0 && cfg.VCPUs != s.MaxVCPUs {
		return fmt.Errorf("%w: %d vCPUs, saved %d", ErrMismatch, cfg.VCPUs, s.MaxVCPUs)
	}
	return nil
}
