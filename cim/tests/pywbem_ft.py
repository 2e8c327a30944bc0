#!/usr/bin/env python3
"""Drives the fault-tolerant pairs' CIM_RedundancySet with pywbem, against the fake host set up
by cim/tests/clients.rs (`pywbem_ft_redundancy_sets`): pair `web` (this host the primary of
VM vm000, fully redundant), pair `db` (the secondary of vm001) and pair `old` (the primary of
vm002, degraded).

    python3 cim/tests/pywbem_ft.py --url http://127.0.0.1:5988 --user admin --password pw

Checks the sets and their class, the member and host associations both ways, the Failover
refusals (secondary: 1, degraded: 3, wrong FailoverFrom: 4), then a Failover of `web` (0) and
the CIM_InstModification of its RedundancyStatus (2 to 4) at a subscribed WBEMListener.
Exit status 0 when every check passed.
"""

import argparse
import socket
import sys
import threading

import pywbem

from lks_checks import NS, VM_CLASS, Checker, free_port, vm_path

SET = "CIM_RedundancySet"


def run(c, conn, args):
    cls = conn.GetClass("LKS_RedundancySet", LocalOnly=False, IncludeQualifiers=True)
    c.check(cls.superclass == SET, f"LKS_RedundancySet derives from {SET}: {cls.superclass}")
    c.check("Failover" in cls.methods, "the class has Failover")
    tos = cls.properties["TypeOfSet"].qualifiers
    c.check(dict(zip(tos["ValueMap"].value, tos["Values"].value)).get("4") == "Sparing", "TypeOfSet 4 is Sparing")

    sets = {s["ElementName"]: s for s in conn.EnumerateInstances(SET)}
    c.check(set(sets) == {"web", "db", "old"}, f"one set per pairing: {sorted(sets)}")
    web, db, old = sets.get("web"), sets.get("db"), sets.get("old")
    if not (web and db and old):
        return
    for s in sets.values():
        c.check(s.classname == "LKS_RedundancySet", f"{s['ElementName']}: class {s.classname}")
        c.check(list(s["TypeOfSet"]) == [4], f"{s['ElementName']}: TypeOfSet {s['TypeOfSet']} (Sparing)")
        c.check(s["MinNumberNeeded"] == 1 and s["MaxNumberSupported"] == 2, f"{s['ElementName']}: 1 needed, 2 at most")
        c.check(s["InstanceID"] == f"LKS:ft:{s['PairID']}:{s['MigrationID']}", f"InstanceID {s['InstanceID']}")
    c.check(web["RedundancyStatus"] == 2 and web["Role"] == "primary", "web: fully redundant, primary")
    c.check(db["RedundancyStatus"] == 2 and db["Role"] == "secondary", "db: fully redundant, secondary")
    c.check(old["RedundancyStatus"] == 3, f"old: degraded ({old['RedundancyStatus']})")
    c.check(conn.GetInstance(web.path)["SystemName"] == "vm000", "GetInstance of the set")

    members = conn.AssociatorNames(web.path, AssocClass="CIM_MemberOfCollection")
    c.check(members == [vm_path("vm000")] or [m.keybindings["Name"] for m in members] == ["vm000"],
            f"web's member here is vm000: {members}")
    back = conn.Associators(vm_path("vm000"), AssocClass="CIM_MemberOfCollection", ResultClass=SET)
    c.check([s["ElementName"] for s in back] == ["web"], f"vm000 is a member of web: {back}")
    refs = conn.References(web.path, ResultClass="CIM_MemberOfCollection")
    c.check(len(refs) == 1 and refs[0]["Member"].keybindings["Name"] == "vm000", "References to the member link")
    host = conn.AssociatorNames(web.path, AssocClass="CIM_HostedCollection")
    c.check(len(host) == 1 and host[0].classname == "LKS_HostComputerSystem", f"web is hosted by the host: {host}")
    hosted = conn.AssociatorNames(host[0], AssocClass="CIM_HostedCollection", ResultClass=SET) if host else []
    c.check(len(hosted) == 3, f"the host hosts the three sets: {hosted}")

    received = []
    got = threading.Event()

    def on_indication(indication, _host):
        received.append(indication)
        got.set()

    port = free_port()
    listener = pywbem.WBEMListener("127.0.0.1", http_port=port)
    listener.add_callback(on_indication)
    listener.start()
    manager = pywbem.WBEMSubscriptionManager(subscription_manager_id="lockstep-ft")
    server_id = manager.add_server(pywbem.WBEMServer(conn))
    try:
        dest = manager.add_destination(server_id, f"http://127.0.0.1:{port}", owned=True, destination_id="ft")
        filt = manager.add_filter(server_id, NS, f"SELECT * FROM CIM_InstModification WHERE SourceInstance ISA {SET}",
                                  query_language="WQL", owned=True, filter_id="ft")
        manager.add_subscriptions(server_id, filt.path, [dest.path], owned=True)

        rc, _ = conn.InvokeMethod("Failover", db.path)
        c.check(rc == 1, f"Failover on the secondary's set: 1 Not Supported, got {rc}")
        rc, _ = conn.InvokeMethod("Failover", old.path, FailoverFrom=vm_path("vm002"))
        c.check(rc == 3, f"Failover on a degraded set: 3, got {rc}")
        rc, _ = conn.InvokeMethod("Failover", web.path, FailoverFrom=vm_path("vm001"))
        c.check(rc == 4, f"Failover from a VM that is not the member: 4 Parameter Error, got {rc}")
        c.check(not got.wait(1.5), "no status changed yet: no indication")

        rc, _ = conn.InvokeMethod("Failover", web.path, FailoverFrom=vm_path("vm000"))
        c.check(rc == 0, f"Failover on the primary's set: 0, got {rc}")
        c.check(got.wait(15), "an indication of the status change arrived")
        if received:
            ind = received[0]
            src, prev = ind["SourceInstance"], ind["PreviousInstance"]
            c.check(ind.classname == "CIM_InstModification", f"indication class {ind.classname}")
            c.check(src is not None and src["ElementName"] == "web", "SourceInstance is web's set")
            c.check(src is not None and src["RedundancyStatus"] == 4, "SourceInstance: Redundancy Lost")
            c.check(prev is not None and prev["RedundancyStatus"] == 2, "PreviousInstance: Fully Redundant")
        c.check(len(received) == 1, f"one indication, got {len(received)}")
        c.check(conn.GetInstance(web.path)["RedundancyStatus"] == 4, "web is Redundancy Lost after the failover")
        rc, _ = conn.InvokeMethod("Failover", web.path)
        c.check(rc == 3, f"a second Failover: 3, got {rc}")
    finally:
        manager.remove_server(server_id)
        listener.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--ca-cert", help="the server's certificate (HTTPS)")
    args = p.parse_args()
    kw = {"ca_certs": args.ca_cert} if args.ca_cert else {}
    conn = pywbem.WBEMConnection(args.url, (args.user, args.password), default_namespace=NS, timeout=60, **kw)
    c = Checker()
    try:
        run(c, conn, args)
    except Exception as e:  # a crash is a failure, reported with the others
        c.check(False, f"{type(e).__name__}: {e}")
    print(f"pywbem ft: {c.passed} passed, {c.failed} failed", flush=True)
    sys.exit(1 if c.failed else 0)


if __name__ == "__main__":
    main()
