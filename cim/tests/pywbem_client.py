#!/usr/bin/env python3
"""Drives lockstep's CIM endpoint with pywbem, as an operator's script would, and checks every
answer. Works against any lockstep host: the fake host of cim/tests/clients.rs, or a real host
with booted guests (give --vm for a VM that can boot, --kernel for DefineSystem, and a longer
--state-timeout).

    python3 cim/tests/pywbem_client.py --url http://127.0.0.1:5988 --user admin --password pw

Exit status 0 when every check passed; each failure is printed with what was expected.
Sections can be picked with --only (comma separated): enum, get, assoc, query, pull, profiles,
errors, state, define, modify, indications, retry, auth.
"""

import argparse
import socket
import sys
import threading
import time

import pywbem

from lks_checks import NS, VM_CLASS, Checker, free_port, vm_path

CS = "CIM_ComputerSystem"


def connect(args, user=None, password=None, namespace=NS):
    creds = (user or args.user, password if password is not None else args.password)
    kw = {}
    if args.url.startswith("https"):
        if args.ca_cert:
            kw["ca_certs"] = args.ca_cert
        else:
            kw["no_verification"] = True
    return pywbem.WBEMConnection(args.url, creds, default_namespace=namespace, timeout=60, **kw)


def wait_state(conn, name, states, timeout):
    """Polls a VM's EnabledState until it is one of `states`."""
    deadline = time.time() + timeout
    state = None
    while time.time() < deadline:
        state = conn.GetInstance(vm_path(name), PropertyList=["EnabledState"])["EnabledState"]
        if state in states:
            return state
        time.sleep(0.2)
    return state


def wait_job(conn, job_path, timeout):
    deadline = time.time() + timeout
    job = None
    while time.time() < deadline:
        job = conn.GetInstance(job_path)
        if job["JobState"] in (7, 8, 9, 10):
            return job
        time.sleep(0.2)
    return job


def test_enum(c, conn, args):
    insts = conn.EnumerateInstances(CS)
    vms = [i for i in insts if i.classname == VM_CLASS]
    hosts = [i for i in insts if i.classname == "LKS_HostComputerSystem"]
    c.check(len(hosts) == 1, f"one host system, got {len(hosts)}")
    c.check(len(vms) >= args.min_vms, f"at least {args.min_vms} VMs, got {len(vms)}")
    for i in vms:
        c.check(i["EnabledState"] in (2, 3, 4, 6, 9, 10), f"{i.path}: EnabledState {i['EnabledState']}")
        c.check(i.path.keybindings["Name"] == i["Name"], f"{i.path}: key Name matches the property")
    names = conn.EnumerateInstanceNames(CS)
    c.check(len(names) == len(insts), "EnumerateInstanceNames gives as many paths as instances")
    shallow = conn.EnumerateInstances(CS, DeepInheritance=False, PropertyList=["Name", "EnabledState", "Caption"])
    for i in shallow:
        c.check(set(i.properties) <= {"Name", "EnabledState", "Caption"}, f"PropertyList honoured: {list(i.properties)}")
    profiles = conn.EnumerateInstances("CIM_RegisteredProfile", namespace="root/interop")
    c.check(len(profiles) >= 11, f"registered profiles in root/interop: {len(profiles)}")
    classes = conn.EnumerateClassNames(ClassName="CIM_ComputerSystem", DeepInheritance=True)
    c.check({"LKS_HostComputerSystem", VM_CLASS} <= set(classes), f"subclasses of CIM_ComputerSystem: {classes}")
    cls = conn.GetClass(VM_CLASS, LocalOnly=False, IncludeQualifiers=True)
    c.check("RequestStateChange" in cls.methods, "the VM class has RequestStateChange")
    rsc = cls.methods["RequestStateChange"]
    c.check("ValueMap" in rsc.parameters["RequestedState"].qualifiers, "RequestedState has its ValueMap")
    c.check(cls.properties["Name"].qualifiers.get("Key") is not None, "Name is a key")


def test_get(c, conn, args):
    vm = args.vm
    inst = conn.GetInstance(vm_path(vm))
    c.check(inst["Name"] == vm, f"GetInstance of {vm}")
    c.check(inst.path is not None and inst.path.classname == VM_CLASS, "GetInstance path")
    partial = conn.GetInstance(vm_path(vm), PropertyList=["ElementName"])
    c.check(list(partial.properties) == ["ElementName"], f"GetInstance PropertyList: {list(partial.properties)}")
    c.expect_error(pywbem.CIM_ERR_NOT_FOUND, lambda: conn.GetInstance(vm_path("no-such-vm")), "GetInstance of a missing VM")
    # ElementName is writable.
    mod = pywbem.CIMInstance(VM_CLASS, properties={"ElementName": "renamed by pywbem"}, path=vm_path(vm))
    conn.ModifyInstance(mod, PropertyList=["ElementName"])
    c.check(conn.GetInstance(vm_path(vm))["ElementName"] == "renamed by pywbem", "ModifyInstance(ElementName)")
    mod["ElementName"] = vm
    conn.ModifyInstance(mod, PropertyList=["ElementName"])
    # A read-only property may be sent back unchanged (clients send whole instances), but not altered.
    other = 3 if inst["EnabledState"] == 2 else 2
    bad = pywbem.CIMInstance(VM_CLASS, properties={"EnabledState": pywbem.Uint16(other)}, path=vm_path(vm))
    c.expect_error(pywbem.CIM_ERR_NOT_SUPPORTED, lambda: conn.ModifyInstance(bad, PropertyList=["EnabledState"]),
                   "ModifyInstance of a read-only property")


def test_assoc(c, conn, args):
    vm = vm_path(args.vm)
    vssd = conn.Associators(vm, AssocClass="CIM_SettingsDefineState", ResultClass="CIM_VirtualSystemSettingData")
    c.check(len(vssd) == 1, f"one VSSD through SettingsDefineState, got {len(vssd)}")
    if vssd:
        rasds = conn.Associators(vssd[0].path, AssocClass="CIM_VirtualSystemSettingDataComponent")
        types = sorted(r["ResourceType"] for r in rasds)
        c.check(3 in types and 4 in types, f"processor and memory RASDs, got ResourceTypes {types}")
        esd = conn.AssociatorNames(vm, AssocClass="CIM_ElementSettingData", ResultRole="SettingData")
        c.check(len(esd) == 1 and esd[0].keybindings["InstanceID"] == vssd[0]["InstanceID"], "ElementSettingData")
    devices = conn.Associators(vm, AssocClass="CIM_SystemDevice", ResultRole="PartComponent")
    kinds = {d.classname for d in devices}
    c.check({"LKS_Processor", "LKS_Memory"} <= kinds, f"devices of the VM: {kinds}")
    procs = conn.AssociatorNames(vm, AssocClass="CIM_SystemDevice", ResultClass="CIM_Processor")
    c.check(all(p.classname == "LKS_Processor" for p in procs) and procs, "ResultClass filter")
    c.check(conn.AssociatorNames(vm, AssocClass="CIM_SystemDevice", Role="PartComponent") == [],
            "Role filter: the VM is never a PartComponent of SystemDevice")
    host = conn.AssociatorNames(vm, AssocClass="CIM_HostedDependency")
    c.check(len(host) == 1 and host[0].classname == "LKS_HostComputerSystem", "HostedDependency to the host")
    caps = conn.Associators(vm, AssocClass="CIM_ElementCapabilities")
    c.check(len(caps) == 1 and 2 in caps[0]["RequestedStatesSupported"], "the VM's capabilities")
    refs = conn.References(vm, ResultClass="CIM_SystemDevice")
    c.check(len(refs) == len(devices), f"References(SystemDevice): {len(refs)} for {len(devices)} devices")
    refnames = conn.ReferenceNames(vm)
    c.check(len(refnames) >= len(refs) + 3, "ReferenceNames of the VM")
    for d in devices:
        pools = conn.AssociatorNames(d.path, AssocClass="CIM_ElementAllocatedFromPool")
        c.check(len(pools) == 1, f"{d.classname} allocated from one pool")


def test_query(c, conn, args):
    all_cs = conn.EnumerateInstances(CS)
    stopped = [i for i in all_cs if i["EnabledState"] == 3]
    wql = conn.ExecQuery("WQL", "SELECT * FROM CIM_ComputerSystem WHERE EnabledState = 3")
    c.check(len(wql) == len(stopped), f"WQL EnabledState = 3: {len(wql)} vs {len(stopped)}")
    wql2 = conn.ExecQuery("WQL", f"SELECT Name FROM {VM_CLASS} WHERE Name LIKE '{args.vm[:2]}%' AND NOT EnabledState = 7")
    c.check(any(i["Name"] == args.vm for i in wql2), "WQL LIKE and NOT")
    c.check(all(list(i.properties) == ["Name"] for i in wql2), "WQL select list")
    cql = conn.ExecQuery("DMTF:CQL", f"SELECT * FROM CIM_ComputerSystem cs WHERE cs.Name = '{args.vm}' OR cs.Caption IS NULL")
    c.check(any(i["Name"] == args.vm for i in cql), "CQL with an alias and IS NULL")
    c.expect_error(pywbem.CIM_ERR_INVALID_QUERY, lambda: conn.ExecQuery("WQL", "SELECT * FROM"), "a broken query")
    c.expect_error(pywbem.CIM_ERR_QUERY_LANGUAGE_NOT_SUPPORTED, lambda: conn.ExecQuery("SQL", "SELECT 1"),
                   "an unknown query language")


def test_pull(c, conn, args):
    everything = conn.EnumerateInstances(CS)
    pulled = list(conn.IterEnumerateInstances(CS, MaxObjectCount=3))
    c.check(len(pulled) == len(everything), f"pull enumeration: {len(pulled)} of {len(everything)}")
    paths = list(conn.IterEnumerateInstancePaths(CS, MaxObjectCount=2))
    c.check(len(paths) == len(everything), "pull paths")
    r = conn.OpenEnumerateInstances(CS, MaxObjectCount=1)
    c.check(not r.eos and len(r.instances) == 1, "OpenEnumerateInstances returns one and a context")
    conn.CloseEnumeration(r.context)
    c.expect_error(pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT,
                   lambda: conn.PullInstancesWithPath(r.context, MaxObjectCount=1), "pull on a closed context")
    assoc = list(conn.IterAssociatorInstances(vm_path(args.vm), AssocClass="CIM_SystemDevice", MaxObjectCount=1))
    c.check(len(assoc) >= 2, "pull associators")
    refs = list(conn.IterReferenceInstancePaths(vm_path(args.vm), MaxObjectCount=1))
    c.check(len(refs) >= 3, "pull reference paths")
    q = conn.OpenQueryInstances("DMTF:CQL", "SELECT Name FROM CIM_ComputerSystem", MaxObjectCount=1)
    got = list(q.instances)
    ctx = q.context
    while not q.eos:
        q = conn.PullInstances(ctx, MaxObjectCount=10)
        got.extend(q.instances)
        ctx = q.context
    c.check(len(got) == len(everything), "OpenQueryInstances and PullInstances")


def test_profiles(c, conn, args):
    server = pywbem.WBEMServer(conn)
    c.check(server.interop_ns == "root/interop", f"interop namespace: {server.interop_ns}")
    c.check("root/cimv2" in server.namespaces, f"namespaces: {server.namespaces}")
    c.check(server.brand == "lockstep", f"brand: {server.brand}")
    wanted = {"System Virtualization", "Virtual System", "Resource Allocation", "Profile Registration",
              "Computer System", "CPU", "System Memory", "Processor Resource Virtualization",
              "Memory Resource Virtualization", "Storage Resource Virtualization",
              "Ethernet Port Resource Virtualization"}
    found = {p["RegisteredName"] for p in server.get_selected_profiles(registered_org="DMTF")}
    c.check(wanted <= found, f"profiles missing: {wanted - found}")
    for p in server.get_selected_profiles("DMTF", "System Virtualization"):
        central = server.get_central_instances(p.path)
        c.check(len(central) == 1 and central[0].classname == "LKS_HostComputerSystem", f"DSP1042 central: {central}")
    for p in server.get_selected_profiles("DMTF", "Virtual System"):
        central = server.get_central_instances(p.path)
        c.check(any(x.keybindings["Name"] == args.vm for x in central), "DSP1057 central instances are the VMs")


def test_errors(c, conn, args):
    c.expect_error(pywbem.CIM_ERR_INVALID_NAMESPACE, lambda: conn.EnumerateInstances(CS, namespace="root/nowhere"),
                   "wrong namespace")
    c.expect_error(pywbem.CIM_ERR_INVALID_CLASS, lambda: conn.EnumerateInstances("CIM_NoSuchClass"), "unknown class")
    c.expect_error(pywbem.CIM_ERR_NOT_FOUND, lambda: conn.GetClass("CIM_NoSuchClass"), "GetClass of an unknown class")
    c.expect_error(pywbem.CIM_ERR_METHOD_NOT_FOUND, lambda: conn.InvokeMethod("NoSuchMethod", vm_path(args.vm)),
                   "unknown method")
    c.expect_error(pywbem.CIM_ERR_INVALID_PARAMETER,
                   lambda: conn.EnumerateInstances("X" * 100000), "a class name of 100 kB")


def test_state(c, conn, args):
    vm = vm_path(args.vm)
    t = args.state_timeout
    state = conn.GetInstance(vm)["EnabledState"]
    if state != 3:
        conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(3))
        wait_state(conn, args.vm, {3}, t)
    rc, _ = conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(2))
    c.check(rc == 0, f"start: return {rc}")
    c.check(wait_state(conn, args.vm, {2}, t) == 2, "the VM runs (EnabledState 2)")
    rc, _ = conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(9))
    c.check(rc == 0 and wait_state(conn, args.vm, {9}, t) == 9, "pause: EnabledState 9 (Quiesce)")
    rc, _ = conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(4))
    c.check(rc == 4097, f"graceful shut down of a paused VM is refused with 4097, got {rc}")
    rc, _ = conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(2))
    c.check(rc == 0 and wait_state(conn, args.vm, {2}, t) == 2, "resume")
    rc, _ = conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(11))
    c.check(rc == 0 and wait_state(conn, args.vm, {2}, t) == 2, "reset keeps it running")
    inst = conn.GetInstance(vm)
    c.check(inst["RequestedState"] == 11, f"RequestedState records the last request: {inst['RequestedState']}")
    rc, out = conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(4),
                                TimeoutPeriod=pywbem.CIMDateTime("00000000000100.000000:000"))
    c.check(rc == 4096 and out.get("Job") is not None, f"graceful shut down runs as a job: {rc}, {dict(out)}")
    if out.get("Job") is not None:
        job = wait_job(conn, out["Job"], t + 60)
        c.check(job is not None and job["JobState"] == 7, f"the job completed: {job and job['JobState']}")
        affected = conn.AssociatorNames(out["Job"], AssocClass="CIM_AffectedJobElement")
        c.check(any(a.keybindings.get("Name") == args.vm for a in affected), "the job affects the VM")
    c.check(wait_state(conn, args.vm, {3}, t) == 3, "the VM stopped (EnabledState 3)")
    rc, _ = conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(9))
    c.check(rc == 4097, f"pausing a stopped VM: 4097, got {rc}")


def embedded(classname, props):
    return pywbem.CIMInstance(classname, properties=props)


def vsms(conn):
    return conn.EnumerateInstanceNames("CIM_VirtualSystemManagementService")[0]


def test_define(c, conn, args):
    name = args.new_vm
    service = vsms(conn)
    vssd = embedded("LKS_VirtualSystemSettingData", {
        "ElementName": name,
        "KernelImagePath": args.kernel,
        "KernelCommandLine": args.cmdline,
    })
    rasds = [
        embedded("LKS_ProcessorAllocationSettingData", {"ResourceType": pywbem.Uint16(3),
                                                        "VirtualQuantity": pywbem.Uint64(1)}),
        embedded("LKS_MemoryAllocationSettingData", {"ResourceType": pywbem.Uint16(4),
                                                     "VirtualQuantity": pywbem.Uint64(args.memory),
                                                     "AllocationUnits": "byte*2^20"}),
    ]
    if args.initrd:
        vssd["InitrdPath"] = args.initrd
    rc, out = conn.InvokeMethod("DefineSystem", service, SystemSettings=vssd, ResourceSettings=rasds)
    c.check(rc == 0 and out.get("ResultingSystem") is not None, f"DefineSystem: {rc}")
    if rc != 0:
        return
    system = out["ResultingSystem"]
    inst = conn.GetInstance(system)
    c.check(inst["Name"] == name and inst["EnabledState"] == 3, "the new VM is defined and stopped")
    mem = conn.Associators(system, AssocClass="CIM_SystemDevice", ResultClass="CIM_Memory")
    c.check(len(mem) == 1, "the new VM has its memory device")
    rc, _ = conn.InvokeMethod("RequestStateChange", system, RequestedState=pywbem.Uint16(2))
    c.check(rc == 0 and wait_state(conn, name, {2}, args.state_timeout) == 2, "the new VM starts")
    rc, _ = conn.InvokeMethod("RequestStateChange", system, RequestedState=pywbem.Uint16(3))
    c.check(rc == 0 and wait_state(conn, name, {3}, args.state_timeout) == 3, "and stops")
    dup, _ = (None, None)
    c.expect_error(pywbem.CIM_ERR_FAILED,
                   lambda: conn.InvokeMethod("DefineSystem", service, SystemSettings=vssd, ResourceSettings=rasds),
                   "defining the same name twice")
    rc, _ = conn.InvokeMethod("DestroySystem", service, AffectedSystem=system)
    c.check(rc == 0, f"DestroySystem: {rc}")
    c.expect_error(pywbem.CIM_ERR_NOT_FOUND, lambda: conn.GetInstance(system), "the VM is gone")
    bad = embedded("LKS_VirtualSystemSettingData", {"ElementName": name})
    c.expect_error(pywbem.CIM_ERR_INVALID_PARAMETER,
                   lambda: conn.InvokeMethod("DefineSystem", service, SystemSettings=bad), "DefineSystem without a kernel")


def test_modify(c, conn, args):
    vm = args.vm
    service = vsms(conn)
    state = conn.GetInstance(vm_path(vm))["EnabledState"]
    if state != 3:
        conn.InvokeMethod("RequestStateChange", vm_path(vm), RequestedState=pywbem.Uint16(3))
        wait_state(conn, vm, {3}, args.state_timeout)
    before = conn.GetInstance(vm_path(vm))
    procs = [r for r in conn.EnumerateInstances("LKS_ProcessorAllocationSettingData")
             if r["InstanceID"] == f"LKS:{vm}:processor"]
    c.check(len(procs) == 1, "the VM's processor RASD")
    if not procs:
        return
    old = procs[0]["VirtualQuantity"]
    new = 2 if old != 2 else 1
    proc = procs[0].copy()
    proc.path = None
    proc["VirtualQuantity"] = pywbem.Uint64(new)
    rc, out = conn.InvokeMethod("ModifyResourceSettings", service, ResourceSettings=[proc])
    c.check(rc == 0, f"ModifyResourceSettings (vCPUs): {rc}")
    cpus = conn.AssociatorNames(vm_path(vm), AssocClass="CIM_SystemDevice", ResultClass="CIM_Processor")
    c.check(len(cpus) == new, f"the VM now has {new} vCPUs: {len(cpus)}")
    disk = embedded("LKS_StorageAllocationSettingData", {
        "InstanceID": f"LKS:{vm}:disk:extra", "ResourceType": pywbem.Uint16(31),
        "HostResource": [args.disk], "Access": pywbem.Uint16(1)})
    rc, out = conn.InvokeMethod("ModifyResourceSettings", service, ResourceSettings=[disk])
    c.check(rc == 0, f"ModifyResourceSettings (add a disk): {rc}")
    disks = conn.Associators(vm_path(vm), AssocClass="CIM_SystemDevice", ResultClass="CIM_LogicalDisk")
    c.check(any(d["DeviceID"] == "extra" for d in disks), "the added disk is a device of the VM")
    vssd_path = pywbem.CIMInstanceName("LKS_VirtualSystemSettingData", {"InstanceID": f"LKS:{vm}"}, namespace=NS)
    nic = embedded("LKS_EthernetPortAllocationSettingData", {
        "ResourceType": pywbem.Uint16(10), "ElementName": "eth9", "Connection": [args.tap],
        "Address": "06:00:AC:10:00:09"})
    rc, out = conn.InvokeMethod("AddResourceSettings", service, AffectedConfiguration=vssd_path, ResourceSettings=[nic])
    c.check(rc == 0, f"AddResourceSettings (a NIC): {rc}")
    ports = conn.Associators(vm_path(vm), AssocClass="CIM_SystemDevice", ResultClass="CIM_EthernetPort")
    c.check(any(p["DeviceID"] == "eth9" for p in ports), "the added NIC is a device of the VM")
    vssd = conn.GetInstance(vssd_path)
    old_cmdline = vssd.get("KernelCommandLine")
    changed = pywbem.CIMInstance("LKS_VirtualSystemSettingData", properties={
        "InstanceID": f"LKS:{vm}", "KernelCommandLine": "console=ttyS0 quiet"})
    rc, _ = conn.InvokeMethod("ModifySystemSettings", service, SystemSettings=changed)
    c.check(rc == 0, f"ModifySystemSettings: {rc}")
    c.check(conn.GetInstance(vssd_path)["KernelCommandLine"] == "console=ttyS0 quiet", "the command line changed")
    if old_cmdline is not None:
        changed["KernelCommandLine"] = old_cmdline
        conn.InvokeMethod("ModifySystemSettings", service, SystemSettings=changed)
    # Put things back for the other sections.
    proc["VirtualQuantity"] = pywbem.Uint64(old)
    conn.InvokeMethod("ModifyResourceSettings", service, ResourceSettings=[proc])
    c.check(conn.GetInstance(vm_path(vm))["Name"] == before["Name"], "the VM is still there")


def test_indications(c, conn, args):
    received = []
    got_one = threading.Event()

    def on_indication(indication, host):
        received.append(indication)
        got_one.set()

    port = free_port()
    listener = pywbem.WBEMListener(args.listener_host, http_port=port)
    listener.add_callback(on_indication)
    listener.start()
    manager = pywbem.WBEMSubscriptionManager(subscription_manager_id="lockstep-test")
    try:
        server_id = manager.add_server(pywbem.WBEMServer(conn))
        dest = manager.add_destination(server_id, f"http://{args.listener_host}:{port}", owned=True,
                                       destination_id="lockstep-test")
        filt = manager.add_filter(server_id, NS,
                                  "SELECT * FROM CIM_InstModification WHERE SourceInstance ISA CIM_ComputerSystem",
                                  query_language="WQL", owned=True, filter_id="vmstate")
        subs = manager.add_subscriptions(server_id, filt.path, [dest.path], owned=True)
        c.check(len(subs) == 1, "one subscription")
        c.check(len(conn.EnumerateInstances("CIM_IndicationSubscription", namespace="root/interop")) >= 1,
                "the subscription is listed")
        vm = vm_path(args.vm)
        if conn.GetInstance(vm)["EnabledState"] == 2:
            conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(3))
            wait_state(conn, args.vm, {3}, args.state_timeout)
            time.sleep(1)
            got_one.clear()
            received.clear()
        conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(2))
        c.check(got_one.wait(args.state_timeout + 10), "an indication arrived")
        if received:
            ind = received[0]
            c.check(ind.classname == "CIM_InstModification", f"indication class {ind.classname}")
            src = ind["SourceInstance"]
            prev = ind["PreviousInstance"]
            c.check(src is not None and src["Name"] == args.vm, "SourceInstance is the VM")
            c.check(src is not None and src["EnabledState"] == 2, "SourceInstance shows it enabled")
            c.check(prev is not None and prev["EnabledState"] == 3, "PreviousInstance shows it disabled")
        conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(3))
        wait_state(conn, args.vm, {3}, args.state_timeout)
    finally:
        manager.remove_server(server_id) if "server_id" in locals() else None
        listener.stop()
    left = conn.EnumerateInstances("CIM_IndicationSubscription", namespace="root/interop")
    c.check(not any(s["Filter"].keybindings.get("Name", "").endswith("vmstate") for s in left),
            "the subscription is removed again")


def test_retry(c, conn, args):
    """A listener that is down when the indication is raised still gets it once it is up."""
    received = threading.Event()
    port = free_port()
    listener = pywbem.WBEMListener(args.listener_host, http_port=port)
    listener.add_callback(lambda indication, host: received.set())
    manager = pywbem.WBEMSubscriptionManager(subscription_manager_id="lockstep-retry")
    server_id = manager.add_server(pywbem.WBEMServer(conn))
    try:
        dest = manager.add_destination(server_id, f"http://{args.listener_host}:{port}", owned=True,
                                       destination_id="late")
        filt = manager.add_filter(server_id, NS, "SELECT * FROM CIM_InstModification", owned=True, filter_id="late")
        manager.add_subscriptions(server_id, filt.path, [dest.path], owned=True)
        vm = vm_path(args.vm)
        target = 3 if conn.GetInstance(vm)["EnabledState"] == 2 else 2
        conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(target))
        wait_state(conn, args.vm, {target}, args.state_timeout)
        time.sleep(1.5)
        c.check(not received.is_set(), "nothing can arrive while the listener is down")
        listener.start()
        c.check(received.wait(20), "the indication arrives once the listener is up (retried)")
        if target == 2:
            conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(3))
            wait_state(conn, args.vm, {3}, args.state_timeout)
    finally:
        manager.remove_server(server_id)
        listener.stop()


def test_auth(c, conn, args):
    bad = connect(args, password=args.password + "x")
    try:
        bad.EnumerateInstanceNames(CS)
        c.check(False, "a wrong password is refused")
    except pywbem.AuthError:
        c.check(True, "a wrong password is refused")
    nobody = connect(args, user="nobody", password="x")
    try:
        nobody.EnumerateInstanceNames(CS)
        c.check(False, "an unknown user is refused")
    except pywbem.AuthError:
        c.check(True, "an unknown user is refused")


SECTIONS = [
    ("enum", test_enum), ("get", test_get), ("assoc", test_assoc), ("query", test_query), ("pull", test_pull),
    ("profiles", test_profiles), ("errors", test_errors), ("state", test_state), ("define", test_define),
    ("modify", test_modify), ("indications", test_indications), ("retry", test_retry), ("auth", test_auth),
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--ca-cert", help="the server's certificate (HTTPS); without it, no verification")
    p.add_argument("--vm", default="vm000", help="an existing VM that can be started and stopped")
    p.add_argument("--min-vms", type=int, default=1)
    p.add_argument("--new-vm", default="cimdefined", help="name for the VM DefineSystem creates")
    p.add_argument("--kernel", default="/boot/vmlinux-fake", help="kernel for DefineSystem")
    p.add_argument("--initrd", default=None)
    p.add_argument("--cmdline", default="console=ttyS0 reboot=k panic=1")
    p.add_argument("--memory", type=int, default=128)
    p.add_argument("--disk", default="/var/lib/images/extra.img", help="image for the added disk")
    p.add_argument("--tap", default="tap-extra", help="host tap device for the added NIC")
    p.add_argument("--listener-host", default="127.0.0.1")
    p.add_argument("--state-timeout", type=float, default=10.0, help="seconds a state change may take")
    p.add_argument("--only", default=None, help="comma-separated sections")
    args = p.parse_args()
    only = set(args.only.split(",")) if args.only else None
    c = Checker()
    conn = connect(args)
    for name, fn in SECTIONS:
        if only and name not in only:
            continue
        before = c.failed
        try:
            fn(c, conn, args)
        except Exception as e:  # a crash in one section is a failure, the others still run
            c.check(False, f"{name}: {type(e).__name__}: {e}")
        print(f"{name}: {'ok' if c.failed == before else 'FAILED'}", flush=True)
    print(f"pywbem: {c.passed} passed, {c.failed} failed", flush=True)
    sys.exit(1 if c.failed else 0)


if __name__ == "__main__":
    main()
