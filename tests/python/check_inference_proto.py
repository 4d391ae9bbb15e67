#!/usr/bin/env python3
"""Check Plinth's proto/inference.proto against the descriptors tritonclient ships.

For every message, field, enum, enum value and RPC declared in OUR file, the
same element must exist in tritonclient's bundled grpc_service / model_config
descriptors with the same name, number, label, type, referenced type,
oneof membership and streaming flags. Fields that Triton has but our file
omits are listed for information only (omitting fields is wire-safe); enum
values that Triton has but our enum lacks ARE mismatches (enums must be exact).

Usage:
  python check_inference_proto.py [PROTO_FILE] [--descriptor-set FILE.pb]
                                  [--protoc PROTOC] [--quiet]

PROTO_FILE defaults to the repository's proto/inference.proto and is compiled with
protoc ($PROTOC, the protoc-bin-vendored binary in the cargo registry, or the
one on PATH). With --descriptor-set an already compiled FileDescriptorSet is
used instead. Needs `pip install tritonclient[grpc]`. Exit status 0 means zero
mismatches.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

from google.protobuf import descriptor_pb2, descriptor_pool

FDP = descriptor_pb2.FieldDescriptorProto
TYPE_NAMES = {v: k for k, v in FDP.Type.items()}
LABEL_NAMES = {v: k for k, v in FDP.Label.items()}


def find_protoc(explicit):
    cands = []
    if explicit:
        cands.append(explicit)
    if os.environ.get("PROTOC"):
        cands.append(os.environ["PROTOC"])
    cands += sorted(glob.glob(os.path.expanduser(
        "~/.cargo/registry/src/*/protoc-bin-vendored-linux-x86_64-*/bin/protoc")))
    if shutil.which("protoc"):
        cands.append(shutil.which("protoc"))
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    sys.exit("error: no protoc found (set $PROTOC or pass --protoc)")


def compile_proto(proto, protoc):
    out = os.path.join(tempfile.mkdtemp(prefix="infcheck"), "inference.pb")
    subprocess.run([protoc, "--proto_path=" + os.path.dirname(os.path.abspath(proto)),
                    "--descriptor_set_out=" + out, os.path.basename(proto)], check=True)
    return out


def load_ours(desc_set_path):
    """Load our FileDescriptorSet into a fresh pool; return its FileDescriptorProtos."""
    fds = descriptor_pb2.FileDescriptorSet()
    with open(desc_set_path, "rb") as f:
        fds.ParseFromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for fdp in fds.file:
        pool.Add(fdp)  # fails loudly on unresolved / duplicate symbols
    out = []
    for fdp in fds.file:
        fd = pool.FindFileByName(fdp.name)
        p = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(p)
        out.append(p)
    return out


def load_triton():
    from tritonclient.grpc import model_config_pb2, service_pb2
    files = []
    for mod in (service_pb2, model_config_pb2):
        p = descriptor_pb2.FileDescriptorProto()
        mod.DESCRIPTOR.CopyToProto(p)
        files.append(p)
    return files


def index(files):
    """full name -> DescriptorProto / EnumDescriptorProto / ServiceDescriptorProto."""
    msgs, enums, services = {}, {}, {}

    def walk_msg(prefix, m):
        name = prefix + "." + m.name
        msgs[name] = m
        for e in m.enum_type:
            enums[name + "." + e.name] = e
        for n in m.nested_type:
            walk_msg(name, n)

    for f in files:
        pkg = "." + f.package if f.package else ""
        for m in f.message_type:
            walk_msg(pkg, m)
        for e in f.enum_type:
            enums[pkg + "." + e.name] = e
        for s in f.service:
            services[pkg + "." + s.name] = s
    return msgs, enums, services


def describe(f, m):
    oneof = m.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
    return {
        "number": f.number,
        "label": LABEL_NAMES[f.label],
        "type": TYPE_NAMES[f.type],
        "type_name": f.type_name or None,
        "oneof": oneof,
        "proto3_optional": f.proto3_optional,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("proto", nargs="?", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto", "inference.proto"))
    ap.add_argument("--descriptor-set")
    ap.add_argument("--protoc")
    ap.add_argument("--quiet", action="store_true", help="hide the informational omissions list")
    a = ap.parse_args()

    ds = a.descriptor_set or compile_proto(a.proto, find_protoc(a.protoc))
    ours_files = load_ours(ds)
    triton_files = load_triton()
    mismatches, info = [], []

    for f in ours_files:
        if f.package != "inference":
            mismatches.append(f"{f.name}: package is {f.package!r}, expected 'inference'")
        if f.syntax != "proto3":
            mismatches.append(f"{f.name}: syntax is {f.syntax!r}, expected 'proto3'")

    o_msgs, o_enums, o_svcs = index(ours_files)
    t_msgs, t_enums, t_svcs = index(triton_files)
    n_fields = n_values = n_methods = 0

    for name, m in sorted(o_msgs.items()):
        t = t_msgs.get(name)
        if t is None:
            mismatches.append(f"message {name}: not in tritonclient")
            continue
        if m.options.map_entry != t.options.map_entry:
            mismatches.append(f"message {name}: map_entry {m.options.map_entry} vs {t.options.map_entry}")
        t_by_name = {tf.name: tf for tf in t.field}
        t_by_num = {tf.number: tf for tf in t.field}
        for f in m.field:
            n_fields += 1
            tf = t_by_name.get(f.name)
            if tf is None:
                other = t_by_num.get(f.number)
                hint = f" (number {f.number} is {other.name!r} there)" if other else ""
                mismatches.append(f"field {name}.{f.name}: not in tritonclient{hint}")
                continue
            ours, theirs = describe(f, m), describe(tf, t)
            for k in ours:
                if ours[k] != theirs[k]:
                    mismatches.append(f"field {name}.{f.name}: {k} {ours[k]!r} != tritonclient {theirs[k]!r}")
        ours_names = {f.name for f in m.field}
        omitted = [f"{tf.name}={tf.number}" for tf in t.field if tf.name not in ours_names]
        if omitted:
            info.append(f"{name}: omits {', '.join(omitted)}")

    for name, e in sorted(o_enums.items()):
        t = t_enums.get(name)
        if t is None:
            mismatches.append(f"enum {name}: not in tritonclient")
            continue
        ours = {v.name: v.number for v in e.value}
        theirs = {v.name: v.number for v in t.value}
        n_values += len(ours)
        for k, v in ours.items():
            if k not in theirs:
                mismatches.append(f"enum value {name}.{k}: not in tritonclient")
            elif theirs[k] != v:
                mismatches.append(f"enum value {name}.{k}: {v} != tritonclient {theirs[k]}")
        for k, v in theirs.items():
            if k not in ours:
                mismatches.append(f"enum value {name}.{k}={v}: missing from our enum")

    for name, s in sorted(o_svcs.items()):
        t = t_svcs.get(name)
        if t is None:
            mismatches.append(f"service {name}: not in tritonclient")
            continue
        t_meth = {mm.name: mm for mm in t.method}
        for mm in s.method:
            n_methods += 1
            tm = t_meth.get(mm.name)
            if tm is None:
                mismatches.append(f"rpc {name}/{mm.name}: not in tritonclient")
                continue
            for k in ("input_type", "output_type", "client_streaming", "server_streaming"):
                if getattr(mm, k) != getattr(tm, k):
                    mismatches.append(f"rpc {name}/{mm.name}: {k} {getattr(mm, k)!r} != "
                                      f"tritonclient {getattr(tm, k)!r}")
        ours_m = {mm.name for mm in s.method}
        skipped = [mm.name for mm in t.method if mm.name not in ours_m]
        if skipped:
            info.append(f"{name}: omits rpcs {', '.join(skipped)}")

    import tritonclient
    ver = getattr(tritonclient, "__version__", None)
    if ver is None:
        try:
            from importlib.metadata import version
            ver = version("tritonclient")
        except Exception:
            ver = "?"
    print(f"checked against tritonclient {ver}: {len(o_msgs)} messages, {n_fields} fields, "
          f"{len(o_enums)} enums ({n_values} values), {n_methods} rpcs")
    if info and not a.quiet:
        print("\ninformational (Triton elements intentionally not declared):")
        for line in info:
            print("  " + line)
    print()
    if mismatches:
        print(f"{len(mismatches)} MISMATCH(ES):")
        for line in mismatches:
            print("  " + line)
        return 1
    print("0 mismatches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
