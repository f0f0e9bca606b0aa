# Removes everything one harness run made on this machine: the processes in
# its network namespaces, the namespaces, its links and its scratch dir.
# Run as `sh -c "$(cat cleanup.sh)" cleanup RUN DIR`.
#
# It first reads stdin to the end. As the watchdog of a live run, stdin is a
# pipe from the test process: the end comes when the Lan is dropped or when
# the test process dies, however it dies (panic, Ctrl-C, SIGKILL). For a dead
# run found at start, stdin is /dev/null and the cleanup starts at once.
# Idempotent: anything already gone is skipped.

trap '' HUP INT TERM PIPE
run=$1
dir=$2
case "$run" in
nmt[0-9][0-9][0-9]) ;;
*)
	echo "cleanup: refusing run name '$run'" >&2
	exit 2
	;;
esac

cat >/dev/null 2>&1

namespaces() {
	ip netns list | sed -n "s/^\($run-h[0-9][0-9]*\)\( .*\)\{0,1\}\$/\1/p"
}

# Everything a host runs lives in its network namespace, so this finds the
# host shells (which hold the mount namespaces), nix-daemons, agents and any
# client still running.
tries=0
while :; do
	pids=$(for ns in $(namespaces); do ip netns pids "$ns"; done)
	[ -z "$pids" ] && break
	kill -9 $pids 2>/dev/null
	tries=$((tries + 1))
	if [ "$tries" -gt 100 ]; then
		echo "cleanup: still alive after SIGKILL:" $pids >&2
		break
	fi
	sleep 0.05
done

for ns in $(namespaces); do
	ip netns del "$ns" || echo "cleanup: cannot delete netns $ns" >&2
done
# Deleting a namespace deletes its veth pair; this catches what is left.
for link in $(ip -o link show | sed -n "s/^[0-9]*: \($run\(br\|v[0-9][0-9]*\)\)[@:].*/\1/p"); do
	ip link del "$link" 2>/dev/null
done

# The bind mounts live only in the hosts' private mount namespaces, gone with
# their processes. A run whose hosts had a journaled ext4 of their own
# (journaled_fs.rs) has it mounted on "$dir/hosts"; its loop device detaches
# itself once it is unmounted. --one-file-system guards against anything else.
if [ -n "$dir" ] && mountpoint -q "$dir/hosts" 2>/dev/null; then
	umount -l "$dir/hosts" || echo "cleanup: cannot unmount $dir/hosts" >&2
fi
# A device the run attached but never got mounted (or marked) would hold the
# image, deleted or not, until reboot. On a device still in use elsewhere
# this only marks it to detach itself.
if [ -n "$dir" ] && [ -e "$dir/hosts.img" ]; then
	for dev in $(losetup --associated "$dir/hosts.img" --noheadings --output NAME 2>/dev/null); do
		losetup --detach "$dev" 2>/dev/null
	done
fi
if [ -n "$dir" ] && [ -d "$dir" ]; then
	rm -rf --one-file-system "$dir" || echo "cleanup: cannot remove $dir" >&2
fi
exit 0
