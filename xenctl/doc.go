// Package xenctl runs Xen guest domains for a host daemon through the
// libxl toolstack's command line, xl: create, pause, unpause, destroy,
// inspect, save, restore, and the capture and restore of clones.
//
// Every xl command goes through a Runner, so the same code drives xl on
// this machine (LocalRunner) or in another dom0, such as the nested test
// bed's, through its agent. Domains are addressed by domain ID once made,
// never by name again.
//
//	Config --Create--> xl create -p -e /dev/null name="..." type="pvh" ...
//	                   [xenchan.Prepare: identity]  xl unpause
//	Domain --Capture--> xl save -c <id> /proc/self/fd/1 --stdout--> xcstream.Split
//	                         descriptor (Dir/descriptor) + pages (PageSink)
//	descriptor + pages --RestoreFrom--> Rebuild (save header renamed)
//	         --stdin--> xl restore -p -e /proc/self/fd/0
//	                   [xenchan.Prepare: identity, greeting]  xl unpause
//
// What xl does, from its sources (tools/xl, Xen 4.17):
//
//   - create: settings may come on the command line after the empty
//     configuration /dev/null (xl_vmcontrol.c create_domain); -p leaves the
//     domain paused; -e starts no xl process to watch the domain, so on_*
//     actions are not carried out and a guest that stops stays a shut-down
//     domain until destroyed. xl prints no domain ID: `xl domid` finds it.
//   - pause and unpause exit 0 even when libxl fails (the return code is
//     ignored); xenctl reads libxl's "libxl: error:" lines instead.
//   - save writes xl's save-file header (the domain's configuration as
//     JSON, with its name and UUID) and the libxl stream to a file it opens
//     by name. Plain save destroys the domain once saved; -p resumes it
//     from its suspend and leaves it paused; -c (checkpoint) resumes it
//     running. On failure xl resumes the domain.
//   - restore opens the image by name, reads the header and restores with
//     the saved configuration (a configuration file would replace it all;
//     command-line settings are ignored on restore). libxl refuses a second
//     domain of a name, so RestoreFrom rewrites the saved configuration's
//     name and UUID in the header it streams.
//   - list -l prints a JSON array of {"domid", "config"} and exits 0 with
//     an empty array when it cannot read the configuration; the run state is
//     only in the plain list's State column.
//
// The images stream through xl's standard input and output, opened as
// /proc/self/fd/0 and 1: no image is written to disk, and a remote runner
// carries them as it carries any command's input and output. Capture and
// RestoreFrom make those pipes themselves (1 MiB, *os.File), so that a
// LocalRunner hands them to xl with no copying in between.
//
// # On real Xen
//
// realxen_test.go runs this package in the dom0s of internal/xenbed's
// nested Xen 4.17 hosts (QEMU TCG, one vCPU each). With a 128 MiB PVH
// guest (Debian's kernel) it measured: Create 1.1-2.3 s; Capture 3.9-4.2
// s, for nearly all of which the guest is suspended, since `xl save -c`
// is not live (libxc suspends the guest, sends every page, then resumes
// it; xl save -c into a pipe alone took 2.8 s there); a descriptor of
// ~13 KB; RestoreFrom 2.7-3.4 s. In a PV dom0 every system call costs a
// trip through the hypervisor: Capture first wrote its page file a page at
// a time and read xl's output through exec's copying goroutine, and the
// guest stayed suspended for 9-10 s.
//
// A PVH guest's stream names every PFN from 0 to 0xfefff, whatever its
// memory: its RAM (32,767 pages with data for 128 MiB), ACPI's pages at
// 0xfc000-0xfc008 and the special pages (xenstore, console, ...) at
// 0xfeff8-0xfefff; the other 1,011,696 entries are holes (XTAB, no data).
// About half of the data pages of a freshly booted guest are zeros
// (16,326 of 32,784), which the descriptor only flags. A PageFile, page n
// at byte n*4096, is thus a sparse file of 4 GiB (0xff000 pages) for any
// PVH guest; what it stores is the stored pages, 64 MiB here.
//
// A PV guest (the same kernel, type="pv") saves faster there (xl save -c
// 1.6 s against 3.8 s for PVH in the same run) and its stream is compact:
// 32,768 PFN entries for 128 MiB, all with data, in 32 PAGE_DATA records.
// Its page-table pages carry their types (L1-L4, pinned or not: 190 of
// them in a freshly booted guest), as PFNs rather than machine frames, so
// they go through the split and the rebuild like any page; libxc on the
// restoring host turns them back into machine frames and pins them.
package xenctl
