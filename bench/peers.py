"""bench/run case 11 (issue 21): the library beside the tools a user would pick instead
(FUSE: vhdimount, qemu-storage-daemon; NBD: qemu-nbd vs vhdio serve; conversion: qemu-img
convert vs vhdio convert and dd), on one 512 MiB image per format. A mixin of bench/run's
Bench: it uses Bench's sh, timed, ab, row, fail, p, rm and args, and FORMATS as set there."""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

MIB = 1 << 20


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Peers:
    FORMATS = {}  # qemu-img format name and options per format, set by bench/run

    # ---- peers (issue 21): FUSE, NBD and conversion tools, on one 512 MiB image per format ----
    PEER_SIZE = 512 * MIB
    # 2000 random 4 KiB blocks (seeded), hashed: what a random-read row must read
    RAND_SUM = ("import os,sys,random,hashlib\nr=random.Random(21)\nfd=os.open(sys.argv[1],os.O_RDONLY)\n"
                "h=hashlib.sha256()\nn=int(sys.argv[2])//4096\n"
                "for _ in range(2000): h.update(os.pread(fd,4096,r.randrange(n)*4096))\nprint(h.hexdigest())\n")

    def seqsum(self, path, lib):
        return self.sh(f"dd if={path} bs=1M status=none | sha256sum", lib).stdout.split()[0]

    def randsum(self, path, lib):
        return self.sh(["python3", "-c", self.RAND_SUM, path, str(self.PEER_SIZE)], lib).stdout.strip()

    def peer_fio(self, filename, lib, jobs=1, mib=None):
        """ns per 4 KiB random read (fio psync, all jobs together). Wall only: a FUSE or NBD
        peer's CPU is in its daemon, not in fio."""
        mib = mib or self.args.peer_rand_mib
        cmd = ["fio", "--name=j", f"--filename={filename}", "--rw=randread", "--bs=4k", "--ioengine=psync",
               "--invalidate=0", "--norandommap", "--randrepeat=1", f"--size={self.PEER_SIZE}",
               f"--io_size={mib}m", "--output-format=json"]
        if jobs > 1:
            cmd += [f"--numjobs={jobs}", "--thread", "--group_reporting"]
        d = json.loads(self.sh(cmd, lib).stdout)
        j = d["jobs"][0]["read"]
        if j["io_bytes"] != jobs * mib * MIB:
            raise RuntimeError(f"fio moved {j['io_bytes']} bytes")
        return 1e9 / j["iops"]

    def daemon(self, cmd, ready, what):
        """Starts a server in the background; waits (10 s) until ready() is true."""
        pr = subprocess.Popen(cmd, cwd=self.w, env=self.env_ref, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t = time.monotonic()
        while not ready():
            if pr.poll() is not None or time.monotonic() - t > 10:
                pr.kill()
                raise RuntimeError(f"{what} did not start: {pr.stderr.read().decode(errors='replace')[-300:]}")
            time.sleep(0.05)

        def stop():
            pr.terminate()
            try:
                pr.wait(10)
            except subprocess.TimeoutExpired:
                pr.kill()
                pr.wait()
        return stop

    def vhdimount(self, fmt):
        mnt = self.p("vhdimount.mnt")
        os.makedirs(mnt, exist_ok=True)
        self.sh(["vhdimount", f"peer.{fmt}", mnt])
        path = os.path.join(mnt, "vhdi1")
        t = time.monotonic()
        while not os.path.exists(path):
            if time.monotonic() - t > 10:
                raise RuntimeError("vhdimount: no vhdi1 after 10 s")
            time.sleep(0.05)
        return path, lambda: subprocess.run(["fusermount3", "-u", mnt], check=False)

    def qsd_fuse(self, fmt):
        q = self.FORMATS[fmt][0]
        path = self.p(f"qsd.{fmt}.export")
        open(path, "w").close()
        stop = self.daemon(["qemu-storage-daemon",
                            "--blockdev", f"driver=file,node-name=file0,filename=peer.{fmt},read-only=on",
                            "--blockdev", f"driver={q},node-name=disk0,file=file0,read-only=on",
                            "--export", f"type=fuse,id=exp0,node-name=disk0,mountpoint={path},writable=off"],
                           lambda: os.stat(path).st_size == self.PEER_SIZE, "qemu-storage-daemon --export type=fuse")
        return path, stop

    def peer_row(self, name, rs, ls, target, ok, note="", unit=None):
        self.row(11, name, unit or ("ns/op" if "random" in name else "s"), rs, ls, target,
                 note if ok else f"CONTENT MISMATCH; {note}")
        if not ok:
            self.rows[-1]["met"] = False

    def case11(self):
        fmts = [f for f in self.args.peer_formats.split(",") if f in self.FORMATS]
        log(f"case 11: peers, one 512 MiB image per format ({','.join(fmts)}): FUSE (vhdimount, qemu-storage-daemon), "
            f"NBD (qemu-nbd vs vhdio serve), conversion (qemu-img convert vs vhdio convert, dd)")
        self.sh(f"head -c {self.PEER_SIZE} /dev/urandom > peer.raw")
        for fmt in fmts:
            q, o = self.FORMATS[fmt]
            self.sh(["qemu-img", "convert", "-f", "raw", "-O", q] + (["-o", o] if o else []) + ["peer.raw", f"peer.{fmt}"])
        want_seq, want_rand = self.seqsum("peer.raw", False), self.randsum("peer.raw", False)
        have_fio = shutil.which("fio") is not None
        for fmt in fmts:
            lib_ok = self.seqsum(f"peer.{fmt}", True) == want_seq and self.randsum(f"peer.{fmt}", True) == want_rand
            lib_seq = lambda: self.timed(f"dd if=peer.{fmt} of=/dev/null bs=1M status=none", lib=True)[0]
            # FUSE peers
            fuse = [("vhdimount", self.vhdimount, 0.05, "vhdimount")] if fmt == "vhd" else []
            fuse.append(("qemu-storage-daemon FUSE export", self.qsd_fuse, 0.20, "qemu-storage-daemon"))
            for peer, start, seq_target, tool in fuse:
                if not os.path.exists("/dev/fuse"):
                    self.skip(11, f"{peer} {fmt}", "/dev/fuse is missing (no FUSE here)")
                    continue
                if not shutil.which(tool):
                    self.skip(11, f"{peer} {fmt}", f"{tool} is not installed")
                    continue
                try:
                    path, stop = start(fmt)
                    try:
                        ok_seq = lib_ok and self.seqsum(path, False) == want_seq
                        rs, ls = self.ab(lambda: self.timed(f"dd if={path} of=/dev/null bs=1M status=none")[0], lib_seq)
                        self.peer_row(f"peer: seq read 512M {fmt}, library vs {peer} (dd bs=1M)", rs, ls,
                                      ("ratio<=", seq_target), ok_seq,
                                      f"{peer} {self.PEER_SIZE / statistics.median(rs) / 1e6:.0f} MB/s, "
                                      f"library {self.PEER_SIZE / statistics.median(ls) / 1e6:.0f} MB/s")
                        if have_fio:
                            ok_rand = lib_ok and self.randsum(path, False) == want_rand
                            for jobs in (1, 2):
                                rs, ls = self.ab(lambda: self.peer_fio(path, False, jobs),
                                                 lambda: self.peer_fio(f"peer.{fmt}", True, jobs))
                                self.peer_row(f"peer: random 4K read {fmt}, {jobs} thread{'s' if jobs > 1 else ''}, "
                                              f"library vs {peer} (fio psync)", rs, ls, ("ratio<=", 0.10), ok_rand,
                                              f"IOPS {peer} {1e9 / statistics.median(rs):.0f}, "
                                              f"library {1e9 / statistics.median(ls):.0f}")
                    finally:
                        stop()
                except RuntimeError as e:
                    self.fail(11, f"{peer} {fmt}", e)
            if have_fio:
                try:
                    # --rand-mib per thread: the library's runs at --peer-rand-mib last milliseconds
                    mib = self.args.rand_mib
                    rs, ls = self.ab(lambda: self.peer_fio(f"peer.{fmt}", True, 1, mib),
                                     lambda: self.peer_fio(f"peer.{fmt}", True, 2, mib))
                    self.peer_row(f"random 4K read {fmt} through the library, 2 threads vs 1 (fio psync)", rs, ls,
                                  ("ratio<=", round(1 / 1.7, 3)), lib_ok,
                                  f"ns per read of both threads together, {mib} MiB per thread; target: 2 threads >= 1.7x the IOPS of 1")
                except (RuntimeError, KeyError, ValueError) as e:
                    self.fail(11, f"random 4K read {fmt}, 2 threads vs 1", e)
                if fmt == fmts[0]:
                    self.case11_scaling_control()
            if fmt == "vhd":
                self.case11_fdtable(fmt)
            self.case11_nbd(fmt, want_seq, lib_ok, have_fio)
            self.case11_convert(fmt, want_seq)
        self.rm("peer.raw", *[f"peer.{f}" for f in fmts])

    def case11_nbd(self, fmt, want_seq, lib_ok, have_fio):
        q = self.FORMATS[fmt][0]
        vhdio = os.path.join(os.path.dirname(self.lib), "vhdio")
        for tool in ("qemu-nbd", "nbdcopy", "nbdkit"):
            if not shutil.which(tool):
                self.skip(11, f"NBD {fmt}", f"{tool} is not installed")
                return
        if not os.path.exists(vhdio):
            self.skip(11, f"NBD {fmt}", f"{vhdio} not built (cargo build --release -p vhdio-cli -p nbdkit-vhdio)")
            return
        qsock, vsock = self.p(f"qnbd.{fmt}.sock"), self.p(f"vserve.{fmt}.sock")
        try:
            stop_q = self.daemon(["qemu-nbd", "-r", "-t", "-e", "16", "-f", q, "-k", qsock, f"peer.{fmt}"],
                                 lambda: os.path.exists(qsock), "qemu-nbd")
        except RuntimeError as e:
            self.fail(11, f"NBD {fmt}", e)
            return
        try:
            stop_v = self.daemon([vhdio, "serve", "-r", "--socket", vsock, f"peer.{fmt}"],
                                 lambda: os.path.exists(vsock), "vhdio serve")
        except RuntimeError as e:
            stop_q()
            self.fail(11, f"NBD {fmt}", e)
            return
        quri, vuri = f"nbd+unix:///?socket={qsock}", f"nbd+unix:///?socket={vsock}"
        try:
            ok = all(self.sh(f"nbdcopy '{u}' - | sha256sum").stdout.split()[0] == want_seq for u in (quri, vuri))
            rs, ls = self.ab(lambda: self.timed(["nbdcopy", quri, "null:"])[0],
                             lambda: self.timed(["nbdcopy", vuri, "null:"])[0])
            self.peer_row(f"peer: nbdcopy 512M {fmt} to null:, vhdio serve vs qemu-nbd", rs, ls, ("ratio<=", 1.0), ok,
                          f"qemu-nbd {self.PEER_SIZE / statistics.median(rs) / 1e6:.0f} MB/s, "
                          f"vhdio serve {self.PEER_SIZE / statistics.median(ls) / 1e6:.0f} MB/s")
            n = self.args.peer_bench_count
            rs, ls = self.ab(lambda: self.qemu_img_bench(quri, n), lambda: self.qemu_img_bench(vuri, n))
            self.peer_row(f"peer: qemu-img bench 4K reads at queue depth 1 {fmt}, vhdio serve vs qemu-nbd", rs, ls,
                          (None, None), ok, f"-c {n} -d 1 -s 4096 -t none: sequential 4K at queue depth 1 "
                          "(qemu-img bench has no random mode); content checked with nbdcopy", unit="ns/op")
            if have_fio:
                rs, ls = self.ab(lambda: self.qemu_img_bench(quri, n), lambda: self.peer_fio(f"peer.{fmt}", True, 1))
                self.peer_row(f"peer: random 4K read {fmt}, library (fio psync) vs qemu-nbd + qemu-img bench QD1", rs, ls,
                              ("ratio<=", 0.20), ok and lib_ok, f"IOPS qemu-nbd {1e9 / statistics.median(rs):.0f}, "
                              f"library {1e9 / statistics.median(ls):.0f}")
        except (RuntimeError, KeyError, ValueError, IndexError) as e:
            self.fail(11, f"NBD {fmt}", e)
        finally:
            stop_v()
            stop_q()

    def case11_scaling_control(self):
        """How far two threads scale on this machine without the library: the raw file, same fio job."""
        try:
            mib = self.args.rand_mib
            rs, ls = self.ab(lambda: self.peer_fio("peer.raw", False, 1, mib),
                             lambda: self.peer_fio("peer.raw", False, 2, mib))
            self.peer_row("  control: random 4K read of the raw file, no library, 2 threads vs 1 (fio psync)", rs, ls,
                          (None, None), True, "the machine's own 2-thread scaling: the ceiling for the rows above")
        except (RuntimeError, KeyError, ValueError) as e:
            self.fail(11, "control: raw file 2 threads vs 1", e)

    def threads4k(self, lib, threads, paths, bs=4096):
        """(ns per read of all threads together, CPU ns per read) of bench/c/threads4k.c."""
        n = self.args.rand_mib * MIB // 4096
        out = self.sh(f"THREADS4K_BS={bs} {self.p('threads4k')} {threads} {n} {self.PEER_SIZE} {' '.join(paths)}",
                      lib).stdout.split()
        return 1e9 / float(out[0]), 1e9 / float(out[1])

    def case11_fdtable(self, fmt):
        """The per-call cost of the library and the fd table's scaling (threads on their own images)."""
        try:
            self.sh(f"cp peer.{fmt} peer2.{fmt}")
            rs, ls = self.ab(lambda: self.threads4k(False, 1, [f"peer.{fmt}"], 1),
                             lambda: self.threads4k(True, 1, [f"peer.{fmt}"], 1))
            self.row(11, f"per call: random 1-byte preads of {fmt}, library vs its container file (threads4k)", "ns/op",
                     rs, ls, (None, None), "added = the library's cost per call (hook, fd table, lseek check, vdisk)")
            two = [f"peer.{fmt}", f"peer2.{fmt}"]
            rs, ls = self.ab(lambda: self.threads4k(True, 1, two), lambda: self.threads4k(True, 2, two))
            self.row(11, f"random 4K read {fmt} through the library, 2 threads on 2 images vs 1 (threads4k)", "ns/op",
                     rs, ls, ("ratio<=", round(1 / 1.7, 3)),
                     "no shared lock: cpu ratio ~1 means the same cost per read per core")
        except (RuntimeError, ValueError, IndexError) as e:
            self.fail(11, f"fd table rows {fmt}", e)
        self.rm(f"peer2.{fmt}")

    def qemu_img_bench(self, uri, n):
        """ns per 4 KiB read of qemu-img bench at queue depth 1 (its own 'Run completed in' time)."""
        out = self.sh(["qemu-img", "bench", "-f", "raw", "-c", str(n), "-d", "1", "-s", "4096", "-t", "none", uri]).stdout
        m = re.search(r"Run completed in ([0-9.]+) seconds", out)
        if not m:
            raise RuntimeError(f"qemu-img bench printed no time: {out[-200:]}")
        return float(m.group(1)) * 1e9 / n

    def case11_convert(self, fmt, want_seq):
        q = self.FORMATS[fmt][0]
        vhdio = os.path.join(os.path.dirname(self.lib), "vhdio")
        n = self.args.convert_pairs
        rm_out = lambda: self.rm("conv.out")
        qconv = lambda: self.timed(["qemu-img", "convert", "-f", q, "-O", "raw", f"peer.{fmt}", "conv.out"])[0]
        try:
            rs, ls = self.ab(qconv, lambda: self.timed(f"dd if=peer.{fmt} of=conv.out bs=1M status=none", lib=True)[0],
                             n=n, setup_ref=rm_out, setup_lib=rm_out)
            ok = self.seqsum("conv.out", False) == want_seq
            self.peer_row(f"peer: convert 512M {fmt} to raw, dd through the library vs qemu-img convert", rs, ls,
                          ("ratio<=", 0.6), ok, f"medians of {n} pairs")
        except RuntimeError as e:
            self.fail(11, f"convert {fmt} to raw (dd)", e)
        if fmt == "vhd":
            # Floor: only the writes of 512 MiB into a new tmpfs file (page allocation + copy-in), no reads, no
            # format: no converter to raw can take less, whatever it reads.
            try:
                rs, ls = self.ab(qconv, lambda: self.timed(f"dd if=/dev/zero of=conv.out bs=1M count={self.PEER_SIZE // MIB} "
                                                           "status=none")[0],
                                 n=n, setup_ref=rm_out, setup_lib=rm_out)
                self.peer_row("  control: dd if=/dev/zero of a new tmpfs file, no reads, vs qemu-img convert vhd to raw",
                              rs, ls, (None, None), True, "the floor of any conversion to raw here: writing 512 MiB")
            except RuntimeError as e:
                self.fail(11, "control: convert floor", e)
        has_convert = os.path.exists(vhdio) and subprocess.run([vhdio, "convert", "--help"], stdout=subprocess.DEVNULL,
                                                               stderr=subprocess.DEVNULL).returncode == 0
        for out_fmt in ("raw", "vhdx" if fmt != "vhdx" else "vhd"):
            name = f"peer: convert 512M {fmt} to {out_fmt}, vhdio convert vs qemu-img convert"
            if not has_convert:
                # TODO(issue 17): `vhdio convert` is written on another branch; this row runs once it is merged.
                self.skip(11, name, "not available: this build's vhdio has no convert command")
                continue
            oq = self.FORMATS.get(out_fmt, (out_fmt,))[0]
            try:
                rs, ls = self.ab(lambda: self.timed(["qemu-img", "convert", "-f", q, "-O", oq, f"peer.{fmt}", "conv.out"])[0],
                                 lambda: self.timed([vhdio, "convert", "-O", out_fmt, f"peer.{fmt}", "conv.out"])[0],
                                 n=n, setup_ref=rm_out, setup_lib=rm_out)
                if out_fmt != "raw":
                    self.sh(["qemu-img", "convert", "-f", oq, "-O", "raw", "conv.out", "conv.check"])
                    ok = self.seqsum("conv.check", False) == want_seq
                    self.rm("conv.check")
                else:
                    ok = self.seqsum("conv.out", False) == want_seq
                self.peer_row(name, rs, ls, ("ratio<=", 0.8), ok,
                              f"medians of {n} pairs; output read back with qemu-img")
            except RuntimeError as e:
                self.fail(11, name, e)
        self.rm("conv.out")

    def skip(self, case, name, reason):
        log(f"  {name}: SKIPPED {reason}")
        self.rows.append(dict(case=case, name=name, unit="", ref_median=None, lib_median=None, ratio=None, cpu_ratio=None,
                              added=None, target="", met=None, ref_runs=[], lib_runs=[], note=f"skipped: {reason}"))
