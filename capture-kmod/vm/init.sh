#!/bin/busybox sh
# The VM test of the kernel-module capture path: /init of the guest that `cargo xtask vm-test`
# boots (Debian's kernel, QEMU TCG). It runs the real product on the guest's own loopback:
# staging, replica and `drv attach --mode kmod` over a RAM disk, and prints one PASS/FAIL line per
# check on the serial console, then "DRV-VM-TEST: DONE" and powers off. The host side fails unless
# it sees DONE and no FAIL.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=1200m tmp /tmp
ip link set lo up
echo 1 > /proc/sys/kernel/printk_ratelimit 2>/dev/null

pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; }
step() { echo "--- $*"; }
finish() {
	echo "DRV-VM-TEST: DONE"
	sync
	poweroff -f
}
die() {
	fail "$*"
	for l in /tmp/drv/*.log; do echo "== $l"; tail -n 40 "$l"; done
	dmesg | tail -n 40
	finish
}

# Modules: Debian's (in dependency order, listed by xtask) and drv_capture.
for m in $(cat /modules.list); do
	insmod "/lib/modules/$m.ko" || die "insmod $m"
done
insmod /lib/modules/brd.ko rd_nr=1 rd_size=131072 || die "insmod brd"
insmod /lib/modules/drv_capture.ko hold_timeout_ms=60000 || die "insmod drv_capture"
pass "modules loaded ($(uname -r))"

D=/tmp/drv
mkdir -p $D/run
export DRV_CONFIG=$D/config.redb DRV_CERTS=$D/certs DRV_RUN_DIR=$D/run DRV_LOG=info
drv ca init --dir $D/certs >/dev/null || die "ca init"
for rn in staging:stg1 replica:rep1 agent:host1 admin:admin; do
	drv ca issue --dir $D/certs --role ${rn%%:*} --name ${rn##*:} >/dev/null || die "ca issue $rn"
done
drv key generate $D/vol.key >/dev/null || die "key"
drv config set endpoint stg1 role=staging address=127.0.0.1:7101 >/dev/null || die "config stg1"
# The DR log holds a whole resync run of the volume (the replica applies one only when complete).
drv config set endpoint rep1 role=replica address=127.0.0.1:7102 data_dir=$D/rep1 drlog_bytes=320M >/dev/null ||
	die "config rep1"
drv config set key k1 path=$D/vol.key >/dev/null || die "config key"
drv config set wrl w0 staging=stg1 "devices=[\"$D/wrl0\"]" segment_bytes=16M device_bytes=160M >/dev/null ||
	die "config wrl"
drv config set volume vol1 size_bytes=128M wrl=w0 'replicas=["rep1"]' key=k1 >/dev/null || die "config volume"

# `cargo xtask bench kmod`: drv.bench=SECONDS,ROUNDS on the kernel command line. A second volume
# is for the agent's own path without the module (drv bench-device --via-agent).
b=$(sed -n 's/.*drv\.bench=\([0-9]*\),\([0-9]*\).*/\1 \2/p' /proc/cmdline)
if [ -n "$b" ]; then
	drv config set volume vol2 size_bytes=128M wrl=w0 'replicas=["rep1"]' key=k1 >/dev/null || die "config vol2"
fi

# The eBPF programs of drv trace/track on this (6.1) kernel: the same binary as on the host, the
# tracepoints' field offsets read from this kernel's tracefs. A loop device is request-based (brd
# and drv0 are bio-based: no request tracepoints).
step "eBPF programs on $(uname -r)"
mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
for mode in tp-btf tracepoint; do
	DRV_EBPF_MODE=$mode drv doctor >$D/doctor.txt 2>&1
	if grep -q "^ok  ebpf programs load" $D/doctor.txt; then
		pass "eBPF programs load and attach: $(grep 'ebpf programs load' $D/doctor.txt | sed 's/  */ /g')"
	else
		fail "eBPF programs ($mode) do not load"
		cat $D/doctor.txt
	fi
done
grep -E "kernel BTF|block tracepoints" $D/doctor.txt
dd if=/dev/zero of=$D/loop.img bs=1M count=16 2>/dev/null
LOOP=$(losetup -f)
losetup $LOOP $D/loop.img || fail "losetup"
drv trace $LOOP --events --json --seconds 5 >$D/trace.json 2>$D/trace.log &
TR=$!
i=0
while ! grep -q '"ready":true' $D/trace.json 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
dd if=/dev/urandom of=$LOOP bs=4k count=8 seek=100 oflag=direct conv=fsync 2>/dev/null || fail "dd to $LOOP"
wait $TR
writes=$(grep -c '"event":"issue","fua":false,"len":4096,"offset":4[0-9]\{5\},"op":"write"' $D/trace.json)
flushes=$(grep -c '"event":"issue".*"op":"flush"' $D/trace.json)
if [ "$writes" = 8 ] && [ "$flushes" -ge 1 ] && grep -q '"lost":{' $D/trace.json; then
	pass "drv trace saw the 8 writes and the flush of dd on $LOOP, and reported its loss counters"
else
	fail "drv trace on $LOOP: $writes writes, $flushes flushes"
	cat $D/trace.json $D/trace.log | tail -n 30
fi
losetup -d $LOOP

drv staging run --name stg1 >$D/staging.log 2>&1 &
STG=$!
drv replica run --name rep1 >$D/replica.log 2>&1 &
REP=$!

# $1: the JSON, $2: the field; prints the first value of that field.
field() { echo "$1" | sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p" | head -n 1; }

AGENT=
start_agent() {
	drv attach vol1 --mode kmod --device /dev/ram0 --name host1 --state-dir $D/agent --ack-timeout-ms 15000 \
		>>$D/agent.log 2>&1 &
	AGENT=$!
	i=0
	while [ $i -lt 600 ]; do
		s=$(drv agent status vol1 --json 2>/dev/null)
		if [ "$(field "$s" mode)" = sync ] && [ "$(field "$s" dirty_bytes)" = 0 ] && [ -b /dev/drv0 ]; then
			return 0
		fi
		kill -0 $AGENT 2>/dev/null || die "the agent exited: $(tail -n 5 $D/agent.log)"
		sleep 0.2
		i=$((i + 1))
	done
	die "the agent did not reach sync mode: $s"
}

# Waits until the replica applied everything the agent sent, then compares the images.
replica_equals_source() {
	i=0
	while [ $i -lt 900 ]; do
		a=$(drv agent status vol1 --json 2>/dev/null)
		r=$(drv status --role replica --server 127.0.0.1:7102 --json 2>/dev/null)
		next=$(field "$a" next_seq)
		applied=$(field "$r" applied_seq)
		if [ -n "$next" ] && [ -n "$applied" ] && [ $((applied + 1)) -ge "$next" ]; then
			break
		fi
		sleep 0.2
		i=$((i + 1))
	done
	# Writes reach /dev/ram0 as bios from the module: drop what its page cache holds from
	# earlier reads, or cmp compares stale pages.
	sync
	echo 3 >/proc/sys/vm/drop_caches
	if cmp /dev/ram0 $D/rep1/vol1.img; then
		pass "$1: replica equals source (through seq $applied; $(md5sum </dev/ram0 | cut -c1-32))"
	else
		fail "$1: replica differs from source (agent next_seq $next, replica applied_seq $applied)"
	fi
}

step "agent attaches; /dev/drv0 over /dev/ram0"
start_agent
pass "drv attach: /dev/drv0 holds writes, agent in sync mode"
drv devices

if [ -n "$b" ]; then
	set -- $b
	secs=$1
	rounds=$2
	dd if=/dev/zero of=/tmp/vol2.img bs=1M count=128 2>/dev/null
	r=1
	while [ $r -le $rounds ]; do
		for spec in "seq 1M 1" "rand 4K 1" "rand 4K 32"; do
			set -- $spec
			base=$(drv bench-device /dev/ram0 --pattern $1 --bs $2 --qd $3 --seconds $secs --json) || fail "bench backing $spec"
			held=$(drv bench-device /dev/drv0 --pattern $1 --bs $2 --qd $3 --seconds $secs --json) || fail "bench drv0 $spec"
			agent=$(drv bench-device /tmp/vol2.img --via-agent vol2 --pattern $1 --bs $2 --qd $3 --seconds $secs --json) ||
				fail "bench via the agent $spec"
			echo "BENCH $1 $2 QD$3 round $r: $(field "$base" iops) $(field "$held" iops) $(field "$agent" iops)"
		done
		r=$((r + 1))
	done
	drv agent status vol1
	finish
fi

step "mkfs.ext4 and a file workload through /dev/drv0"
mkfs.ext4 -q -F /dev/drv0 || die "mkfs.ext4"
mkdir -p /mnt
mount -t ext4 /dev/drv0 /mnt || die "mount"
dd if=/dev/urandom of=/mnt/a bs=64k count=160 conv=fsync 2>/dev/null || die "write /mnt/a"
mkdir -p /mnt/dir
i=0
while [ $i -lt 40 ]; do
	dd if=/dev/urandom of=/mnt/dir/f$i bs=4k count=$((i % 7 + 1)) 2>/dev/null
	i=$((i + 1))
done
sync
md5sum /mnt/a >/tmp/a.md5
umount /mnt || die "umount"
st=$(drv devices --json)
if [ "$(field "$st" flush_writes)" -gt 0 ] && [ "$(field "$st" fua_writes)" -gt 0 ]; then
	pass "FLUSH and FUA reach the module: $(field "$st" flush_writes) flushes, $(field "$st" fua_writes) FUA writes (ext4 journal, fsync)"
else
	fail "no FLUSH or no FUA seen by the module: $st"
fi
replica_equals_source "mkfs + files"

step "NBD: a snapshot exported by the replica, attached by the kernel's nbd-client, fsck'd, mounted"
RA="--server 127.0.0.1:7102"
drv snapshot create vol1 nbd1 $RA >/dev/null || fail "snapshot create"
drv snapshot export vol1 nbd1 --listen 127.0.0.1:10809 $RA >/dev/null || fail "snapshot export"
if nbd-client 127.0.0.1 10809 /dev/nbd0 -N nbd1 >$D/nbd.log 2>&1; then
	pass "nbd-client attached the export as /dev/nbd0 ($(cat /sys/block/nbd0/size) sectors)"
	if e2fsck -fn /dev/nbd0 >$D/fsck.log 2>&1; then pass "e2fsck -fn /dev/nbd0: clean"; else
		fail "e2fsck -fn /dev/nbd0"
		tail -n 20 $D/fsck.log
	fi
	mkdir -p /mnt2
	if mount -t ext4 -o ro /dev/nbd0 /mnt2; then
		want=$(cut -d' ' -f1 /tmp/a.md5)
		got=$(md5sum /mnt2/a | cut -d' ' -f1)
		[ "$want" = "$got" ] && pass "read-only mount of /dev/nbd0: /a reads back ($got)" || fail "/a over NBD: $got, want $want"
		umount /mnt2
	else
		fail "mount -o ro /dev/nbd0"
	fi
	nbd-client -d /dev/nbd0 >/dev/null 2>&1 || fail "nbd-client -d"
else
	fail "nbd-client: $(cat $D/nbd.log)"
fi
drv snapshot unexport vol1 nbd1 $RA >/dev/null || fail "snapshot unexport"
drv snapshot delete vol1 nbd1 $RA >/dev/null || fail "snapshot delete"

step "rmmod is refused while a device exists"
if rmmod drv_capture 2>/dev/null; then fail "rmmod succeeded with /dev/drv0 present"; else pass "rmmod refused while /dev/drv0 exists"; fi

step "agent SIGKILLed mid-workload: pass-through with a dirty bitmap, restart resyncs"
mount -t ext4 /dev/drv0 /mnt || die "mount 2"
rm -f /tmp/stop
(
	i=0
	while [ ! -f /tmp/stop ] || [ $i -lt 60 ]; do
		dd if=/dev/urandom of=/mnt/dir/g$((i % 60)) bs=16k count=$((i % 5 + 1)) conv=fsync 2>/dev/null
		i=$((i + 1))
	done
) &
WL=$!
sleep 2
kill -9 $AGENT
wait $AGENT 2>/dev/null
# Writes go on without the agent for a while.
sleep 2
touch /tmp/stop
wait $WL
st=$(drv devices --json)
if [ "$(field "$st" holding)" = false ] && [ "$(field "$st" dirty_blocks)" != 0 ]; then
	pass "agent gone: writes went through, $(field "$st" dirty_blocks) blocks marked dirty"
else
	fail "after the agent's SIGKILL the device says: $st"
fi
md5sum /mnt/dir/g59 >/tmp/g.md5 || fail "the workload's last file is missing"
umount /mnt || die "umount 2"
start_agent
st=$(drv devices --json)
[ "$(field "$st" dirty_blocks)" = 0 ] && [ "$(field "$st" holding)" = true ] &&
	pass "agent restarted: bitmap taken and resynced, holding again" || fail "after restart: $st"
replica_equals_source "after agent SIGKILL and restart"

step "staging paused: writers wait in state D, and go on when it resumes"
kill -STOP $STG
dd if=/dev/urandom of=/dev/drv0 bs=4k count=1 seek=30000 conv=fsync 2>/dev/null &
W=$!
sleep 3
state=$(sed -n 's/^[0-9]* ([^)]*) \(.\).*/\1/p' /proc/$W/stat 2>/dev/null)
if [ "$state" = D ]; then pass "writer blocked in state D while staging is paused"; else fail "writer state '$state' (want D)"; fi
kill -CONT $STG
wait $W && pass "writer completed after staging resumed" || fail "writer failed after staging resumed"
replica_equals_source "after the pause"

step "agent stalled (SIGSTOP): held bytes bounded, then the hold timeout passes writes through"
P=/sys/module/drv_capture/parameters
echo 65536 >$P/max_held_bytes
echo 3000 >$P/hold_timeout_ms
kill -STOP $AGENT
WS=
for k in 1 2 3 4; do
	dd if=/dev/urandom of=/dev/drv0 bs=64k count=1 seek=$((1000 + k * 3)) conv=fsync 2>/dev/null &
	WS="$WS $!"
done
sleep 2
st=$(drv devices --json)
hb=$(field "$st" held_bytes)
waiting=0
for w in $WS; do kill -0 $w 2>/dev/null && waiting=$((waiting + 1)); done
if [ "$hb" -gt 0 ] && [ "$hb" -le 65536 ] && [ $waiting = 4 ]; then
	pass "4 writers of 64 KiB, limit 64 KiB: $hb bytes held ($(field "$st" held_writes) writes), all 4 writers wait"
else
	fail "held bytes $hb over the limit of 65536, or a writer finished ($waiting waiting): $st"
fi
ok=1
for w in $WS; do wait $w || ok=0; done
st=$(drv devices --json)
if [ $ok = 1 ] && [ "$(field "$st" holding)" = false ] && [ "$(field "$st" timeouts)" = 1 ]; then
	pass "hold timeout: the writers completed through pass-through, $(field "$st" dirty_blocks) blocks dirty"
else
	fail "after the hold timeout (writers ok=$ok): $st"
fi
echo 67108864 >$P/max_held_bytes
echo 60000 >$P/hold_timeout_ms
kill -CONT $AGENT
i=0
while [ $i -lt 300 ]; do
	st=$(drv devices --json)
	s=$(drv agent status vol1 --json 2>/dev/null)
	[ "$(field "$st" holding)" = true ] && [ "$(field "$st" dirty_blocks)" = 0 ] &&
		[ "$(field "$s" mode)" = sync ] && [ "$(field "$s" dirty_bytes)" = 0 ] && break
	sleep 0.2
	i=$((i + 1))
done
[ "$(field "$st" holding)" = true ] && pass "agent resumed: attached again, dirty blocks resynced" ||
	fail "agent did not attach again: $st / $s"
replica_equals_source "after the hold timeout"

step "device gone without detach (as after a host crash): the next attach resyncs everything"
kill -9 $AGENT
wait $AGENT 2>/dev/null
dd if=/dev/urandom of=/dev/drv0 bs=64k count=4 seek=700 conv=fsync 2>/dev/null || fail "pass-through write"
drv detach vol1 || fail "drv detach without an agent"
[ -b /dev/drv0 ] && fail "/dev/drv0 still exists"
start_agent
if grep -q "resyncing the whole volume" $D/agent.log; then
	pass "a new device over an unclean state: the whole volume resynced"
else
	fail "no full resync after the device vanished unclean"
fi
replica_equals_source "after the device vanished with dirty blocks"

step "detach, rmmod, kernel log"
drv detach vol1 || fail "drv detach"
wait $AGENT 2>/dev/null
[ -b /dev/drv0 ] && fail "/dev/drv0 still exists after detach" || pass "drv detach removed /dev/drv0 and stopped the agent"
rmmod drv_capture && pass "rmmod drv_capture" || fail "rmmod drv_capture"
if dmesg | grep -E "BUG|WARNING|Oops|Call Trace|hung_task"; then fail "kernel log has the lines above"; else pass "kernel log clean"; fi
kill $STG $REP 2>/dev/null
finish
