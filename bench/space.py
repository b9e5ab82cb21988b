"""bench/run cases 13 (issue 16: blkdiscard and vhdio compact) and 14 (issue 19: qcow2 reads).
A mixin of bench/run's Bench, like bench/peers.py: it uses Bench's sh, timed, ab, row, fail,
p, rm, args, and Peers' daemon, seqsum, randsum, peer_fio, PEER_SIZE, FORMATS."""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys

MIB = 1 << 20
GIB = 1 << 30


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Space:
    DISCARD_SIZE = 64 * GIB
    DISCARD_BLOCKS = 96  # 32 MiB blocks written: 3 GiB of data spread over the 64 GiB disk
    # reads the first 32 MiB of every STEP bytes (the blocks discard_image writes): all zero?
    ZERO_CHECK = ("import os,sys\nfd=os.open(sys.argv[1],os.O_RDONLY)\nstep=int(sys.argv[2])\n"
                  "z=bytes(1<<20)\nok=all(os.pread(fd,1<<20,i*step+j*(1<<20))==z for i in range(96) for j in range(32))\n"
                  "print('zero' if ok else 'data')\n")
    COMPACT_SIZE = 4 * GIB
    COMPACT_RUN = 64 * MIB  # data and zero runs alternate: a multiple of every format's block size

    def written_bytes(self, cmd, lib, container):
        """Bytes written to `container` by cmd and its children (strace -f -y: pwrite64,
        pwritev, pwritev2, write; the return values of the calls naming the container)."""
        out = self.p(f"strace.{os.getpid()}.log")
        pre = ["-E", f"LD_PRELOAD={self.lib}"] if lib else []
        self.sh(["strace", "-f", "-y", "-qq", "-e", "trace=pwrite64,pwritev,pwritev2,write", "-o", out] + pre + cmd)
        want = f"<{os.path.realpath(self.p(container))}>"
        n = 0
        with open(out) as fh:
            for line in fh:
                m = re.search(r"= (\d+)\s*$", line)
                if want in line and m:
                    n += int(m.group(1))
        os.unlink(out)
        return n

    def qemu_io(self, q, path, cmds):
        args = ["qemu-io", "-f", q]
        for c in cmds:
            args += ["-c", c]
        self.sh(args + [path])

    def discard_step(self):
        """Bytes between the starts of the blocks discard_image writes (a multiple of 32 MiB)."""
        return self.DISCARD_SIZE // (32 * MIB) // self.DISCARD_BLOCKS * 32 * MIB

    def discard_image(self, q, path):
        """64 GiB sparse image (or raw file) with 96 of its 2048 32 MiB blocks written."""
        self.rm(path)
        if q == "raw":
            self.sh(["truncate", "-s", str(self.DISCARD_SIZE), path])
        else:
            self.sh(["qemu-img", "create", "-q", "-f", "vhdx", "-o", "subformat=dynamic,block_size=32M", path,
                     str(self.DISCARD_SIZE)])
        step = self.discard_step()
        self.qemu_io(q, path, [f"write -q -P 0x{(i % 250) + 1:02x} {i * step} 32M"
                               for i in range(self.DISCARD_BLOCKS)])

    def case13(self):
        log("case 13: blkdiscard of a 64 GiB VHDX holding 3 GiB (vs fallocate --punch-hole of a raw file); "
            "vhdio compact of a 4 GiB image with half its blocks zero (vs qemu-img convert to the same format)")
        for tool in ("blkdiscard", "strace", "fallocate"):
            if not shutil.which(tool):
                self.skip(13, "blkdiscard 64G vhdx", f"{tool} is not installed")
                break
        else:
            self.case13_discard()
        self.case13_compact()

    def case13_discard(self):
        name = "blkdiscard -f of a 64G vhdx holding 3G vs fallocate --punch-hole of a 64G raw file"
        try:
            rs, ls = self.ab(lambda: self.timed(["fallocate", "--punch-hole", "-o", "0", "-l", str(self.DISCARD_SIZE),
                                                 "d.raw"]),
                             lambda: self.timed(["blkdiscard", "-f", "d.vhdx"], lib=True),
                             setup_ref=lambda: self.discard_image("raw", "d.raw"),
                             setup_lib=lambda: self.discard_image("vhdx", "d.vhdx"))
            self.rm("d.raw")
            self.discard_image("vhdx", "d.vhdx")
            before = os.stat(self.p("d.vhdx")).st_blocks * 512
            wrote = self.written_bytes(["blkdiscard", "-f", "d.vhdx"], True, "d.vhdx")
            # qemu's vhdx driver reports every block as data: ask vhdio map
            vhdio = os.path.join(os.path.dirname(self.lib), "vhdio")
            mapped = json.loads(self.sh([vhdio, "map", "--output", "json", "d.vhdx"]).stdout)
            data = sum(e["length"] for e in mapped if e.get("data") and not e.get("zero"))
            check = self.sh(["qemu-img", "check", "-q", "-f", "vhdx", "d.vhdx"], check=False).returncode
            zeros = self.sh(["python3", "-c", self.ZERO_CHECK, "d.vhdx", str(self.discard_step())],
                            lib=True).stdout.strip() == "zero"
            ok = data == 0 and check == 0 and zeros
            self.row(13, name, "s", rs, ls, ("lib<=", 1.0),
                     f"{wrote} bytes written to the container (target < 1 MiB: metadata only); "
                     f"{before // MIB} MiB allocated before; vhdio map after: {data} bytes of data; "
                     f"the written blocks read {'as zeros' if zeros else 'NOT as zeros'} through the library; "
                     f"qemu-img check rc {check}; blkdiscard refuses a regular file, so ref = punching the raw file"
                     + ("" if ok else "; NOT ALL ZERO AFTER"))
            if not ok or wrote >= MIB:
                self.rows[-1]["met"] = False
        except (RuntimeError, ValueError, KeyError) as e:
            self.fail(13, name, e)
        self.rm("d.raw", "d.vhdx")

    def compact_image(self, fmt, path):
        """4 GiB image, every block allocated, every other 64 MiB run all zeros (written as zeros)."""
        q, o = self.FORMATS[fmt]
        self.rm(path)
        self.sh(["qemu-img", "create", "-q", "-f", q] + (["-o", o] if o else []) + [path, str(self.COMPACT_SIZE)])
        n = self.COMPACT_SIZE // self.COMPACT_RUN
        self.qemu_io(q, path, [f"write -q -P {0 if i % 2 else (i % 250) + 1} {i * self.COMPACT_RUN} {self.COMPACT_RUN}"
                               for i in range(n)])

    def case13_compact(self):
        vhdio = os.path.join(os.path.dirname(self.lib), "vhdio")
        for fmt in self.FORMATS:
            q, o = self.FORMATS[fmt]
            name = f"compact 4G {fmt}, half its blocks zero: vhdio compact vs qemu-img convert -O {q}"
            try:
                size = {}

                def ref():
                    t = self.timed(["qemu-img", "convert", "-f", q, "-O", q] + (["-o", o] if o else [])
                                   + [f"k.{fmt}", f"kq.{fmt}"])
                    size["qemu"] = os.path.getsize(self.p(f"kq.{fmt}"))
                    return t

                def lib():
                    size["before"] = os.path.getsize(self.p(f"k.{fmt}"))
                    t = self.timed([vhdio, "compact", f"k.{fmt}"])
                    size["after"] = os.path.getsize(self.p(f"k.{fmt}"))
                    return t

                rs, ls = self.ab(ref, lib, setup_ref=lambda: (self.rm(f"kq.{fmt}"), self.compact_image(fmt, f"k.{fmt}")),
                                 setup_lib=lambda: self.compact_image(fmt, f"k.{fmt}"))
                # k is compacted now; kq came from an identical image (qemu-io writes are deterministic)
                self.compact_image(fmt, f"ko.{fmt}")
                same = all(self.sh(["qemu-img", "compare", "-q", "-f", q, "-F", q, f"ko.{fmt}", x],
                                   check=False).returncode == 0 for x in (f"k.{fmt}", f"kq.{fmt}"))
                halves = size["after"] <= size["before"] * 0.55
                # The target is the file size; times are reported (vhdio compact syncs
                # each moved block before switching its table entry, qemu-img convert never syncs).
                self.row(13, name, "s", rs, ls, ("none", None),
                         f"file {size['before'] // MIB} -> {size['after'] // MIB} MiB (qemu-img: {size['qemu'] // MIB} MiB; "
                         f"target: halves); qemu-img compare with the original: {'same' if same else 'DIFFERENT'}")
                self.rows[-1]["met"] = same and halves
                self.rows[-1]["target"] = "file halves"
            except (RuntimeError, KeyError) as e:
                self.fail(13, name, e)
            self.rm(f"k.{fmt}", f"kq.{fmt}", f"ko.{fmt}")

    def case14(self):
        log("case 14: 512 MiB qcow2 (all written): dd bs=1M and random 4K reads through the library "
            "vs the raw file, and vs qemu-nbd + nbdcopy")
        size = self.PEER_SIZE
        self.sh(f"head -c {size} /dev/urandom > qs.tmp")
        self.sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "qs.tmp", "q.qcow2"])
        self.sh(["qemu-img", "convert", "-f", "raw", "-O", "raw", "qs.tmp", "qs.raw"])
        self.rm("qs.tmp")
        want_seq, want_rand = self.seqsum("qs.raw", False), self.randsum("qs.raw", False)
        lib_seq = self.seqsum("q.qcow2", True) == want_seq
        lib_rand = self.randsum("q.qcow2", True) == want_rand
        mbs = lambda runs: size / statistics.median([x[0] if isinstance(x, tuple) else x for x in runs]) / 1e6
        try:
            rs, ls = self.ab(lambda: self.timed("dd if=qs.raw of=/dev/null bs=1M status=none"),
                             lambda: self.timed("dd if=q.qcow2 of=/dev/null bs=1M status=none", lib=True))
            self.peer_row(f"qcow2 seq read 512M (dd bs=1M), library vs the raw file", rs, ls, ("ratio<=", 1.10),
                          lib_seq, f"lib {mbs(ls):.0f} MB/s, raw {mbs(rs):.0f} MB/s")
            self.rows[-1]["case"] = 14
            # Control, as in case 1: the same container pages read without the library.
            rs, ls = self.ab(lambda: self.timed("dd if=q.qcow2 of=/dev/null bs=1M status=none"),
                             lambda: self.timed("dd if=q.qcow2 of=/dev/null bs=1M status=none", lib=True))
            self.peer_row("  control: vs dd of the qcow2 container file itself", rs, ls, ("ratio<=", 1.10),
                          lib_seq, "same page-cache pages; isolates the library's cost")
            self.rows[-1]["case"] = 14
        except RuntimeError as e:
            self.fail(14, "qcow2 seq read vs raw", e)
        if shutil.which("qemu-nbd") and shutil.which("nbdcopy"):
            sock = self.p("q.nbd.sock")
            try:
                stop = self.daemon(["qemu-nbd", "-r", "-t", "--shared=16", "-f", "qcow2", "-k", sock, "q.qcow2"],
                                   lambda: os.path.exists(sock), "qemu-nbd")
                try:
                    uri = f"nbd+unix:///?socket={sock}"
                    ok = lib_seq and self.sh(f"nbdcopy '{uri}' - | sha256sum").stdout.split()[0] == want_seq
                    rs, ls = self.ab(lambda: self.timed(["nbdcopy", uri, "null:"])[0],
                                     lambda: self.timed("dd if=q.qcow2 of=/dev/null bs=1M status=none", lib=True)[0])
                    self.peer_row("qcow2 seq read 512M, library dd vs qemu-nbd -f qcow2 (nbdcopy URI null:)", rs, ls,
                                  ("ratio<=", 1.0), ok, f"qemu-nbd {mbs(rs):.0f} MB/s, library {mbs(ls):.0f} MB/s")
                    self.rows[-1]["case"] = 14
                finally:
                    stop()
            except (RuntimeError, IndexError) as e:
                self.fail(14, "qcow2 seq read vs qemu-nbd", e)
        else:
            self.skip(14, "qcow2 vs qemu-nbd + nbdcopy", "qemu-nbd or nbdcopy is not installed")
        try:
            mib = self.args.rand_mib
            if shutil.which("fio"):
                tool = "fio psync"
                rs, ls = self.ab(lambda: self.peer_fio("qs.raw", False, 1, mib),
                                 lambda: self.peer_fio("q.qcow2", True, 1, mib))
            else:
                tool = "rand4k"
                n = mib * MIB // 4096
                r4k = lambda f, lib: float(self.sh([self.p("rand4k"), "randread", f, str(size), str(n), "0"],
                                                   lib).stdout.split()[0])
                rs, ls = self.ab(lambda: r4k("qs.raw", False), lambda: r4k("q.qcow2", True))
            self.peer_row(f"qcow2 random 4K read, 1 thread, library vs the raw file ({tool})", rs, ls, ("ratio<=", 1.2),
                          lib_rand, f"IOPS raw {1e9 / statistics.median(rs):.0f}, library {1e9 / statistics.median(ls):.0f}; "
                          "2000 seeded 4K blocks hashed through the library = the source's")
            self.rows[-1]["case"] = 14
        except (RuntimeError, KeyError, ValueError) as e:
            self.fail(14, "qcow2 random 4K read", e)
        self.rm("q.qcow2", "qs.raw")
