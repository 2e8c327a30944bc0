#!/usr/bin/env python3
"""Drives a live migration between two lockstep hosts through their CIM endpoints (DSP1081),
as an operator's script would, and checks every answer: the profile and its service,
capabilities and associations; CIM errors for an unknown VM, an unreachable destination, a
wrong token and a malformed destination, with the VM running on at the source; then
PrepareIncomingMigration on the destination, CheckVirtualSystemIsMigratableToHost and
MigrateVirtualSystemToHost on the source, the job's PercentComplete polled to 100, the
destination's job, the VM running there, and the indication of the job's end.

    python3 cim/tests/pywbem_migration.py --source http://127.0.0.1:5988 \\
        --destination http://127.0.0.1:5989 --user admin --password pw --vm mover --new-name moved

Exit status 0 when every check passed; each failure is printed with what was expected.
"""

import argparse
import socket
import sys
import threading
import time

import pywbem

from lks_checks import NS, VM_CLASS, Checker, free_port, vm_path

SERVICE = "LKS_VirtualSystemMigrationService"
SETTINGS = "LKS_VirtualSystemMigrationSettingData"


def connect(url, args):
    return pywbem.WBEMConnection(url, (args.user, args.password), default_namespace=NS, timeout=120,
                                 no_verification=True)


def service(conn):
    services = conn.EnumerateInstanceNames(SERVICE)
    if len(services) != 1:
        raise RuntimeError(f"expected one {SERVICE}, found {services}")
    return services[0]


def settings(token, **extra):
    props = {"MigrationType": pywbem.Uint16(2)}
    if token is not None:
        props["Token"] = token
    props.update(extra)
    inst = pywbem.CIMInstance(SETTINGS, properties=props)
    return inst


def enabled_state(conn, name):
    try:
        return conn.GetInstance(vm_path(name), PropertyList=["EnabledState"])["EnabledState"]
    except pywbem.CIMError:
        return None


def check_profile(c, conn, args):
    server = pywbem.WBEMServer(conn)
    profiles = server.get_selected_profiles("DMTF", "Virtual System Migration")
    if not c.check(len(profiles) == 1, f"one DSP1081 profile registered: {profiles}"):
        return
    c.check(profiles[0]["RegisteredVersion"] == "1.0.0", f"version {profiles[0]['RegisteredVersion']}")
    central = server.get_central_instances(profiles[0].path)
    c.check(len(central) == 1 and central[0].classname == SERVICE, f"DSP1081 central instance: {central}")
    scoping = conn.AssociatorNames(profiles[0].path, AssocClass="CIM_ReferencedProfile")
    c.check(any(conn.GetInstance(p)["RegisteredName"] == "System Virtualization" for p in scoping),
            "DSP1081 is referenced by System Virtualization")
    svc = service(conn)
    caps = conn.Associators(svc, AssocClass="CIM_ElementCapabilities")
    c.check(len(caps) == 1, f"one capabilities instance: {caps}")
    if caps:
        cap = caps[0]
        c.check(list(cap["AsynchronousMethodsSupported"]) == [2], "MigrateVirtualSystemToHost is asynchronous")
        c.check(list(cap["SynchronousMethodsSupported"]) == [4], "the check is synchronous")
        c.check(list(cap["MigrationTypesSupported"]) == [2], "live migration")
        c.check(set(cap["DestinationHostFormatsSupported"]) == {3, 4}, "IPv4 and IPv6 destinations")
    hosts = conn.AssociatorNames(svc, AssocClass="CIM_HostedService")
    c.check([h.classname for h in hosts] == ["LKS_HostComputerSystem"], f"hosted by the host: {hosts}")
    affected = conn.AssociatorNames(svc, AssocClass="CIM_ServiceAffectsElement")
    c.check(any(a.keybindings.get("Name") == args.vm for a in affected), f"the service affects the VM: {affected}")
    defaults = conn.Associators(svc, AssocClass="CIM_ElementSettingData", ResultClass=SETTINGS)
    c.check(len(defaults) == 1 and defaults[0]["MigrationType"] == 2, f"default settings: {defaults}")


def migrate(conn, vm, destination, migration_settings):
    return conn.InvokeMethod("MigrateVirtualSystemToHost", service(conn), ComputerSystem=vm_path(vm),
                             DestinationHost=destination, MigrationSettingData=migration_settings)


def prepare(conn, name):
    rc, out = conn.InvokeMethod("PrepareIncomingMigration", service(conn), Listen="127.0.0.1:0", SystemName=name)
    return rc, out


def check_errors(c, src, dst, args):
    c.expect_error(pywbem.CIM_ERR_NOT_FOUND,
                   lambda: migrate(src, "nosuchvm", "127.0.0.1:1", settings("0" * 64)), "an unknown VM")
    closed = free_port()
    why = c.expect_error(pywbem.CIM_ERR_FAILED,
                         lambda: migrate(src, args.vm, f"127.0.0.1:{closed}", settings("0" * 64)),
                         "an unknown host (nothing listens)")
    c.check("connect" in why, f"the error says the destination cannot be reached: {why}")
    rc, out = prepare(dst, args.new_name)
    c.check(rc == 4096, f"PrepareIncomingMigration returns 4096, not {rc}")
    wrong = out["Token"][::-1]
    why = c.expect_error(pywbem.CIM_ERR_FAILED,
                         lambda: migrate(src, args.vm, out["DestinationHost"], settings(wrong)), "a wrong token")
    c.check("authentication" in why, f"the error says the token was refused: {why}")
    c.expect_error(pywbem.CIM_ERR_INVALID_PARAMETER,
                   lambda: migrate(src, args.vm, "nowhere", settings("0" * 64)), "a malformed destination")
    c.expect_error(pywbem.CIM_ERR_INVALID_PARAMETER,
                   lambda: migrate(src, args.vm, "127.0.0.1:1", settings(None)), "no token")
    c.check(enabled_state(src, args.vm) == 2, "the VM runs on at the source after the refusals")


def subscribe(src, listener_port):
    manager = pywbem.WBEMSubscriptionManager(subscription_manager_id="lockstep-migration-test")
    server_id = manager.add_server(pywbem.WBEMServer(src))
    dest = manager.add_destination(server_id, f"http://127.0.0.1:{listener_port}", owned=True,
                                   destination_id="lockstep-migration-test")
    filt = manager.add_filter(server_id, NS,
                              "SELECT * FROM CIM_InstModification WHERE SourceInstance ISA LKS_MigrationJob",
                              query_language="WQL", owned=True, filter_id="migrationjobs")
    manager.add_subscriptions(server_id, filt.path, [dest.path], owned=True)
    return manager, server_id


def check_migration(c, src, dst, args, received, got_end):
    rc, out = prepare(dst, args.new_name)
    c.check(rc == 4096, f"PrepareIncomingMigration returns 4096, not {rc}")
    token, destination, incoming_job = out["Token"], out["DestinationHost"], out["Job"]
    c.check(len(token) == 64, "a 32-byte token in hex")
    c.check(destination.startswith("127.0.0.1:") and not destination.endswith(":0"),
            f"the real listening address: {destination}")
    wanted = settings(token, MaxDowntime=pywbem.Uint64(args.max_downtime), AutoConverge=True,
                      Bandwidth=pywbem.Uint16(args.bandwidth), BandwidthUnit="byte / second * 2^20")
    rc, out = src.InvokeMethod("CheckVirtualSystemIsMigratableToHost", service(src), ComputerSystem=vm_path(args.vm),
                               DestinationHost=destination, MigrationSettingData=wanted)
    c.check(rc == 0 and out["IsMigratable"] is True, f"the VM is migratable: {rc} {out}")

    rc, out = migrate(src, args.vm, destination, wanted)
    if not c.check(rc == 4096 and out.get("Job") is not None, f"MigrateVirtualSystemToHost: {rc} {out}"):
        return
    job = out["Job"]
    seen = []
    deadline = time.time() + args.timeout
    final = None
    while time.time() < deadline:
        inst = src.GetInstance(job)
        seen.append(inst["PercentComplete"])
        if inst["JobState"] != 4:
            final = inst
            break
        time.sleep(0.05)
    print(f"PercentComplete seen: {sorted(set(int(p) for p in seen))}", flush=True)
    if not c.check(final is not None, f"the job ended within {args.timeout} s"):
        return
    c.check(final["JobState"] == 7, f"the job completed: JobState {final['JobState']}, "
                                    f"error {final.get('ErrorDescription')}")
    c.check(final["PercentComplete"] == 100, "PercentComplete reached 100")
    c.check(17 in final["OperationalStatus"], "OperationalStatus says Completed")
    c.check(all(a <= b for a, b in zip(seen, seen[1:])), f"PercentComplete never goes back: {seen}")
    c.check(any(0 < p < 100 for p in seen), f"PercentComplete moved through values between 0 and 100: {seen}")
    c.check(final["Direction"] == "outgoing" and final.get("Downtime") is not None,
            f"the job says how long the pause was: {final.get('Downtime')}")
    done = dst.GetInstance(incoming_job)
    deadline = time.time() + args.timeout
    while done["JobState"] == 4 and time.time() < deadline:
        time.sleep(0.1)
        done = dst.GetInstance(incoming_job)
    c.check(done["JobState"] == 7 and done["Direction"] == "incoming",
            f"the destination's job completed: {done['JobState']} {done.get('ErrorDescription')}")
    if args.check_arrival:
        deadline = time.time() + args.timeout
        while enabled_state(dst, args.new_name) != 2 and time.time() < deadline:
            time.sleep(0.1)
        c.check(enabled_state(dst, args.new_name) == 2, "the VM runs on the destination")
        c.check(enabled_state(src, args.vm) is None, "the source gave the VM up")
    c.check(got_end.wait(20), "an indication of the job's end arrived")
    ends = [i for i in received if i["SourceInstance"]["MigrationID"] == final["MigrationID"]]
    if c.check(len(ends) == 1, f"one indication for the job: {len(ends)} of {len(received)}"):
        now, before = ends[0]["SourceInstance"], ends[0]["PreviousInstance"]
        c.check(now.classname == "LKS_MigrationJob" and now["JobState"] == 7, f"the job as it ended: {now}")
        c.check(before is not None and before["JobState"] == 4, "the job before: running")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="the source host's CIM URL")
    p.add_argument("--destination", required=True, help="the destination host's CIM URL")
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--vm", required=True, help="a running VM on the source")
    p.add_argument("--new-name", required=True, help="the name it gets on the destination")
    p.add_argument("--bandwidth", type=int, default=1024, help="MiB/s limit (a low one makes progress visible)")
    p.add_argument("--max-downtime", type=int, default=500, help="milliseconds")
    p.add_argument("--timeout", type=float, default=90.0)
    p.add_argument("--check-arrival", action="store_true",
                   help="check the VM runs on the destination and is gone from the source")
    args = p.parse_args()
    c = Checker()
    src, dst = connect(args.source, args), connect(args.destination, args)
    received = []
    got_end = threading.Event()

    def on_indication(indication, host):
        src_inst = indication.get("SourceInstance")
        if src_inst is not None and src_inst.classname == "LKS_MigrationJob" and src_inst["Direction"] == "outgoing":
            received.append(indication)
            if src_inst["JobState"] == 7:
                got_end.set()

    port = free_port()
    listener = pywbem.WBEMListener("127.0.0.1", http_port=port)
    listener.add_callback(on_indication)
    listener.start()
    manager = None
    sections = [("profile", lambda: check_profile(c, src, args)),
                ("errors", lambda: check_errors(c, src, dst, args)),
                ("migration", lambda: check_migration(c, src, dst, args, received, got_end))]
    try:
        manager, server_id = subscribe(src, port)
        for name, fn in sections:
            before = c.failed
            try:
                fn()
            except Exception as e:  # a crash in one section is a failure, the others still run
                c.check(False, f"{name}: {type(e).__name__}: {e}")
            print(f"{name}: {'ok' if c.failed == before else 'FAILED'}", flush=True)
    finally:
        if manager is not None:
            manager.remove_server(server_id)
        listener.stop()
    print(f"pywbem migration: {c.passed} passed, {c.failed} failed", flush=True)
    sys.exit(1 if c.failed else 0)


if __name__ == "__main__":
    main()
