#!/usr/bin/env python3
"""Host-side helpers for the test guest's workloads (reference implementations and manual checks).

  lks_host.py pattern <image> <sector> <count> <seed> [byte-offset]   check a disk image against the sector
                                                        pattern (read from byte-offset instead of sector * 512:
                                                        e.g. a `memfill` block in a snapshot's memory file)
  lks_host.py fnv <file> [offset] [length]              FNV-1a 64 of bytes, as the guest prints it
  lks_host.py udp-recv <bind-ip> <port> <count> [seconds]   receive `net udp-send`/`bench net-tx` datagrams,
                                                        check sequence and checksums
  lks_host.py udp-send <ip> <port> <count> <size> [src-port]   send numbered datagrams (for `net udp-echo`
                                                        and `bench net-rx`), check the echoes, then "stop"
  lks_host.py udp-stream <bind-ip> <port> [idle-seconds] [guest-ip stop-after-seconds]
                                                        receive a `net udp-stream` until it is idle (sending
                                                        "stop" to the guest's port 40000 first if asked): count
                                                        losses, duplicates, reordering, FNV-1a 64 of the payloads
  lks_host.py journal-send <ip> <port> <first> <count>  send `net udp-journal` requests REQ <n> p<n>, one at a
                                                        time (resent every 0.5 s, 10 times at most), check each
                                                        ACK's digest
  lks_host.py journal-check <image> [first count]       read the journal out of a disk image: slots, valid and
                                                        corrupt records; with a range, which requests are missing

The formats are those of tests/guest/README.md ("Data formats", "Journal workload").
"""
import socket
import sys
import time

M64 = (1 << 64) - 1


def fnv1a64(data, h=0xCBF29CE484222325):
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def sector_pattern(seed, sector):
    x = ((seed * 0x9E3779B97F4A7C15) & M64) ^ ((sector * 0xBF58476D1CE4E5B9) & M64)
    x = x or 1
    out = bytearray()
    for _ in range(64):
        x ^= (x << 13) & M64
        x ^= x >> 7
        x ^= (x << 17) & M64
        out += x.to_bytes(8, "little")
    return bytes(out)


def udp_payload(seq, size):
    data = bytes(((seq * 7) + i) & 0xFF for i in range(size - 16))
    return b"LKS1" + (seq & 0xFFFFFFFF).to_bytes(4, "little") + fnv1a64(data).to_bytes(8, "little") + data


def udp_check(payload):
    """Returns the sequence number if the payload is a valid test payload, else None."""
    if len(payload) < 16 or payload[:4] != b"LKS1":
        return None
    if fnv1a64(payload[16:]) != int.from_bytes(payload[8:16], "little"):
        return None
    return int.from_bytes(payload[4:8], "little")


def cmd_pattern(image, first, count, seed, offset):
    bad = []
    with open(image, "rb") as f:
        f.seek(first * 512 if offset is None else offset)
        data = f.read(count * 512)
    for i in range(count):
        if data[i * 512:(i + 1) * 512] != sector_pattern(seed, first + i):
            bad.append(first + i)
    print(f"pattern sectors={count} bad={len(bad)} first_bad={bad[0] if bad else None} fnv1a64={fnv1a64(data):016x}")
    return 0 if not bad else 1


def cmd_udp_recv(bind, port, count, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((bind, port))
    s.settimeout(seconds)
    seqs, bad, nbytes, start = [], 0, 0, None
    try:
        while len(seqs) + bad < count:
            payload, _ = s.recvfrom(65536)
            start = start or time.monotonic()
            nbytes += len(payload)
            seq = udp_check(payload)
            if seq is None:
                bad += 1
            else:
                seqs.append(seq)
    except socket.timeout:
        pass
    elapsed = (time.monotonic() - start) if start else 0
    in_order = all(b > a for a, b in zip(seqs, seqs[1:]))
    print(f"udp-recv received={len(seqs)} bad={bad} bytes={nbytes} in_order={in_order} "
          f"missing={count - len(seqs) - bad} seconds={elapsed:.3f}")
    return 0 if bad == 0 and in_order and len(seqs) == count else 1


def cmd_udp_send(ip, port, count, size, src_port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", src_port))
    s.settimeout(2)
    echoed = bad = 0
    for seq in range(count):
        payload = udp_payload(seq, size)
        s.sendto(payload, (ip, port))
        try:
            reply, _ = s.recvfrom(65536)
            if reply == payload:
                echoed += 1
            else:
                bad += 1
        except socket.timeout:
            pass
    s.sendto(b"stop", (ip, port))
    print(f"udp-send sent={count} echoed={echoed} mismatched={bad}")
    return 0 if echoed == count else 1


def cmd_udp_stream(bind, port, idle, guest, stop_after):
    """Receives until `idle` seconds pass without a datagram; prints what a pause test compares with the
    guest's `net udp-stream ... sent=<n> fnv1a64=<h>` line."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((bind, port))
    s.settimeout(0.2)
    seen, bad, out_of_order, last, h = set(), 0, 0, -1, 0xCBF29CE484222325
    received = duplicates = 0
    start = last_rx = time.monotonic()
    stop_sent = guest is None
    while time.monotonic() - last_rx < idle:
        if not stop_sent and time.monotonic() - start >= stop_after:
            s.sendto(b"stop", (guest, 40000))
            stop_sent = True
        try:
            payload, _ = s.recvfrom(65536)
        except socket.timeout:
            continue
        last_rx = time.monotonic()
        seq = udp_check(payload)
        if seq is None:
            bad += 1
            continue
        received += 1
        h = fnv1a64(payload, h)
        duplicates += seq in seen
        out_of_order += seq < last
        seen.add(seq)
        last = max(last, seq)
    missing = (last + 1) - len(seen)
    print(f"udp-stream received={received} distinct={len(seen)} duplicates={duplicates} missing={missing} "
          f"out_of_order={out_of_order} bad={bad} last_seq={last} fnv1a64={h:016x}")
    return 0 if duplicates == missing == out_of_order == bad == 0 else 1

def journal_digest(n, payload):
    return fnv1a64(n.to_bytes(8, "little") + payload)


def cmd_journal_send(ip, port, first, count):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.5)
    answered = bad = 0
    for n in range(first, first + count):
        payload = b"p%d" % n
        for _ in range(10):
            sock.sendto(b"REQ %d " % n + payload, (ip, port))
            try:
                reply = sock.recv(2048).split(b" ")
            except socket.timeout:
                continue
            if len(reply) == 3 and reply[0] == b"ACK" and int(reply[1]) == n:
                answered += 1
                bad += int(reply[2], 16) != journal_digest(n, payload)
                break
    print(f"journal-send answered={answered} unanswered={count - answered} bad_digest={bad}")
    return 0 if answered == count and bad == 0 else 1


def cmd_journal_check(image, first, count):
    with open(image, "rb") as f:
        data = f.read()
    header = data[:512]
    sealed = lambda sector: fnv1a64(sector[:504]) == int.from_bytes(sector[504:512], "little")
    if header[:8] != b"LKSJHDR1" or not sealed(header):
        print("journal-check error=no-header")
        return 1
    slots = int.from_bytes(header[24:32], "little")
    records, corrupt = {}, 0
    for s in range(1, min(slots, len(data) // 512 - 1) + 1):
        sector = data[s * 512:(s + 1) * 512]
        if sector[:8] != b"LKSJREC1":
            continue
        n = int.from_bytes(sector[8:16], "little")
        length = int.from_bytes(sector[16:20], "little")
        if not sealed(sector) or length > 256 or 1 + n % slots != s:
            corrupt += 1
            continue
        records[n] = sector[24:24 + length]
    missing = [n for n in range(first, first + count) if n not in records]
    print(f"journal-check slots={slots} records={len(records)} corrupt={corrupt} missing={len(missing)}"
          + (f" first_missing={missing[0]}" if missing else ""))
    return 0 if corrupt == 0 and not missing else 1


def main(argv):
    if len(argv) >= 5 and argv[0] == "pattern":
        offset = int(argv[5], 0) if len(argv) > 5 else None
        return cmd_pattern(argv[1], int(argv[2], 0), int(argv[3], 0), int(argv[4], 0), offset)
    if len(argv) >= 2 and argv[0] == "fnv":
        with open(argv[1], "rb") as f:
            f.seek(int(argv[2], 0) if len(argv) > 2 else 0)
            data = f.read(int(argv[3], 0)) if len(argv) > 3 else f.read()
        print(f"{fnv1a64(data):016x}")
        return 0
    if len(argv) >= 4 and argv[0] == "udp-recv":
        return cmd_udp_recv(argv[1], int(argv[2]), int(argv[3]), float(argv[4]) if len(argv) > 4 else 10)
    if len(argv) >= 5 and argv[0] == "udp-send":
        src = int(argv[5]) if len(argv) > 5 else 0
        return cmd_udp_send(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), src)
    if len(argv) >= 3 and argv[0] == "udp-stream":
        idle = float(argv[3]) if len(argv) > 3 else 3
        guest, stop_after = (argv[4], float(argv[5])) if len(argv) > 5 else (None, 0)
        return cmd_udp_stream(argv[1], int(argv[2]), idle, guest, stop_after)
    if len(argv) >= 5 and argv[0] == "journal-send":
        return cmd_journal_send(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
    if len(argv) >= 2 and argv[0] == "journal-check":
        first, count = (int(argv[2]), int(argv[3])) if len(argv) > 3 else (0, 0)
        return cmd_journal_check(argv[1], first, count)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
