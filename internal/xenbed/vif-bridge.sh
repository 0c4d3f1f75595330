#!/bin/sh
# /etc/xen/scripts/vif-bridge of a xenbed dom0: libxl runs it to plug a
# guest's network backend (vif<domid>.<n>) into its bridge (the vif's
# bridge= setting, xenbr0 by default). Debian's script needs bash and
# util-linux, which dom0 does not have. libxl passes the interface in $vif
# and the backend's xenstore directory in $XENBUS_PATH.
case "$1" in
online | add)
	br=$(xenstore-read "$XENBUS_PATH/bridge" 2>/dev/null)
	br=${br:-xenbr0}
	ip link set "$vif" up &&
		brctl addif "$br" "$vif" &&
		xenstore-write "$XENBUS_PATH/hotplug-status" connected
	;;
offline | remove)
	br=$(xenstore-read "$XENBUS_PATH/bridge" 2>/dev/null)
	brctl delif "${br:-xenbr0}" "$vif" 2>/dev/null
	ip link set "$vif" down 2>/dev/null
	true
	;;
esac
