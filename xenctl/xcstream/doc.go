// Package xcstream splits a Xen domain save image into a small descriptor
// and its guest pages, and rebuilds the byte-identical image from the two.
//
// A file written by `xl save` is xl's save-file header (with the domain's
// configuration) followed by a stream in the "libxenlight Domain Image
// Format" (docs/specs/libxl-migration-stream.pandoc, libxl stream version
// 2). Its LIBXC_CONTEXT record is followed inline by a stream in the
// "libxenctrl (libxc) Domain Image Format"
// (docs/specs/libxc-migration-stream.pandoc, versions 2 and 3; Xen 4.14 and
// later write 3), which runs to its own END record; libxl records (the
// emulator's xenstore keys and context) then continue to the libxl END.
//
//	xl save file --Split--> Descriptor (every record but page contents)
//	                  \---> PageSink (one call per non-zero guest page)
//	Descriptor + PageSource --Rebuild--> the same bytes, for `xl restore`
//
// Split reads the image once, front to back, and holds one page at a time:
// PAGE_DATA records become runs of PFN entries in the descriptor, each page
// payload goes to the sink, and all-zero payloads are only flagged (Rebuild
// writes zeros for them). Every other record, of either layer and known or
// not, is kept verbatim. The descriptor's binary form (MarshalBinary) is
// versioned and sealed with a sha256.
//
// Rebuild must reproduce the image exactly, so Split refuses what a
// descriptor cannot express rather than normalise it: non-zero padding or
// reserved fields (Xen's savers always write zeros), a PFN whose payload is
// sent twice (live migration's resends and VERIFY rounds; `xl save` sends
// each page once), big-endian streams (which Xen itself refuses) and the
// checkpointed streams of Remus and COLO. Everything else Xen's restore
// code checks structurally — lengths, page types, record order around
// LIBXC_CONTEXT, STATIC_DATA_END and END — is checked here too, against the
// caller's Limits, before any allocation sized by the input.
package xcstream
