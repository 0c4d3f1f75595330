//go:build !(linux && amd64)

package qemuctl

const noTHPSupported = false

func noTHPCommand(binary string, args []string) ([]string, error) {
	return append([]string{binary}, args...), nil
}
