#!/bin/busybox sh
# /init of a xenbed dom0 (see package xenbed). It brings dom0 up in steps,
# recording each in /run/xenbed/init-status ("running: <step>", then "done"
# or "failed: <step>") for the agent's readiness check. The agent starts as
# soon as the control NIC is up, so a later failure can be inspected
# through it. /init never exits (the kernel would panic): it finally execs
# busybox init, which only reaps orphaned daemons.
#
# Parameters come from the kernel command line:
#   xenbed.host=N        host index, for the hostname
#   xenbed.ctlmac=MAC    the NIC behind QEMU's user-mode network (the agent's)
#   xenbed.bedmac=MAC    the NIC on the bed's network, enslaved to xenbr0
#   xenbed.ip=A.B.C.D/N  xenbr0's address
#   xenbed.mtu=N         the bed NIC's and xenbr0's MTU (optional; 1500)
#   xenbed.token=HEX     the agent's secret (read by the agent itself)

/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/xenbed /run/xen /run/xenstored /var/log/xen/console /var/lib/xen

LOG=/var/log/xenbed-init.log

# param NAME prints the value of NAME= on the kernel command line.
param() {
	for w in $(cat /proc/cmdline); do
		case "$w" in "$1"=*) echo "${w#*=}"; return 0 ;; esac
	done
	return 1
}

status() {
	echo "$1" >/run/xenbed/init-status
	echo "xenbed-init: $1" >/dev/console
}

# step NAME COMMAND... runs COMMAND unless an earlier step failed.
failed=""
step() {
	[ -n "$failed" ] && return 1
	name=$1
	shift
	status "running: $name"
	echo "== $name" >>$LOG
	if ! "$@" >>$LOG 2>&1; then
		failed=$name
		status "failed: $name"
		tail -n 20 $LOG >/dev/console
		return 1
	fi
}

# nic MAC prints the name of the interface with that address.
nic() {
	for d in /sys/class/net/*; do
		if [ "$(cat "$d/address")" = "$1" ]; then
			basename "$d"
			return 0
		fi
	done
	echo "no interface with address $1" >&2
	return 1
}

load_modules() {
	while read -r m; do
		insmod "$m" || return 1
	done </etc/xenbed/modules
}

control_net() {
	hostname "xenbed-h$(param xenbed.host)"
	sysctl -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 || true
	ip link set lo up
	ctl=$(nic "$(param xenbed.ctlmac)") || return 1
	ip addr add 10.0.2.15/24 dev "$ctl" && ip link set "$ctl" up
}

start_agent() {
	setsid /bin/xenbed-agent </dev/null >/var/log/xenbed-agent.log 2>&1 &
}

start_xenstored() {
	xenstored --pid-file /run/xenstored.pid || return 1
	i=0
	until [ -S /run/xenstored/socket ] && timeout 5 xenstore-ls / >/dev/null; do
		i=$((i + 1))
		[ $i -gt 300 ] && { echo "xenstored did not come up"; return 1; }
		sleep 0.1
	done
}

bed_net() {
	bed=$(nic "$(param xenbed.bedmac)") || return 1
	# A new bridge has STP off, so ports forward at once (busybox's brctl
	# cannot set stp or setfd).
	mtu=$(param xenbed.mtu) || mtu=1500
	# The bridge keeps an MTU set on it, whatever its guests' vifs have.
	brctl addbr xenbr0 &&
		ip link set "$bed" mtu "$mtu" up &&
		brctl addif xenbr0 "$bed" &&
		ip link set xenbr0 mtu "$mtu" &&
		ip addr add "$(param xenbed.ip)" dev xenbr0 &&
		ip link set xenbr0 up
}

step modules load_modules
step control-net control_net
step agent start_agent
step xenfs mount -t xenfs xenfs /proc/xen
step xenstored start_xenstored
step xen-init-dom0 xen-init-dom0
step xenconsoled xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
step bed-net bed_net
[ -z "$failed" ] && status done

exec /bin/busybox init
