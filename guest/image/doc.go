// Package image builds what a snowflock guest boots: Debian's kernel, as an
// uncompressed vmlinux, and an initramfs whose /init is the static sfguest
// binary.
//
// Data flow of Build:
//
//	apt-get download (pinned .deb, sha256 checked against apt-cache show)
//	   -> <CacheDir>/debs/*.deb
//	kernel .deb  -> ar -> data.tar.xz -> /boot/vmlinuz-<release>  -> bzImage payload -> xz -> vmlinux (ELF)
//	                                  -> /lib/modules/<release>/*.ko -> dependency index (modules.dep;
//	                                     Debian's package has none, so it is derived from each module's
//	                                     .modinfo depends=) -> the requested modules and their
//	                                     dependencies, in load order, listed in /etc/sfguest/modules
//	busybox-static .deb -> ar -> data.tar.xz -> /bin/busybox
//	sfguest + busybox + modules + ExtraFiles -> sorted, normalised entries
//	   -> newc cpio (sha256 of these bytes is Image.Hash) -> <CacheDir>/initramfs/<hash>.cpio[.gz]
//
// Everything is unpacked in Go (no dpkg, cpio or xz binaries); apt is used only
// to download, because it checks the archive's signatures. Every stage is
// cached under CacheDir, keyed by the content it came from (the .deb's sha256,
// the initramfs's sha256), so a second Build with the same inputs downloads
// and unpacks nothing. Builds sharing a CacheDir serialise on a lock file.
//
// The uncompressed vmlinux matters because guests boot under QEMU TCG, where
// the kernel's own XZ decompression costs several seconds of every boot; QEMU
// boots the ELF directly through its PVH entry point.
package image
