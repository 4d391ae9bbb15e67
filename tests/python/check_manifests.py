#!/usr/bin/env python3
"""Load Plinth's deployment manifests into typed models and hold them to rules.

Usage:
  python check_manifests.py DIR [DIR ...]

Every *.yaml (and *.yml) file under each DIR is read, document by document.
Each object goes through two stages:

1. Typed load. The object is matched, by apiVersion and kind, to a model
   class: the `kubernetes` package's models for Kubernetes' own kinds
   (V1Deployment, V1Service, ...), the `kserve` package's models for
   ServingRuntime, ClusterServingRuntime and InferenceService. A kind that
   is not in the table below is refused. The object is then walked field by
   field along the class's `openapi_types` (what type each field holds) and
   `attribute_map` (the field's name in YAML). A key that is not a field of
   the model at that point is an error, as is a value of the wrong shape or
   primitive type. The packages' own `from_dict` helpers silently drop keys
   they do not know, which is why the walk is done here. Where a subtree is
   clean, the walk also builds the model instance from it, so the packages'
   own checks (required fields, strict types) run as well.

2. Rules, on every pod the manifests describe (a Deployment's or
   StatefulSet's pod template, a serving runtime's containers and volumes,
   an InferenceService's predictor):
     a. restricted Pod Security: seccompProfile RuntimeDefault, runAsNonRoot,
        no privilege escalation, every capability dropped, no privileged or
        root user, no host namespaces, host paths or host ports, and a
        read-only root filesystem with an emptyDir mounted at /tmp;
     b. probes: liveness (and startup) probes are httpGet or tcpSocket on a
        port the server listens on (tcpSocket only for KServe, whose Knative
        mode moves probes onto the serving port, which speaks only HTTP/2
        when the InferenceService serves gRPC); the readiness probe is an
        httpGet of /v2/health/ready on the HTTP port;
     c. ports: every declared containerPort is one the server listens on,
        and every Service's targetPort reaches one.
   The ports a container listens on are read from its arguments,
   --http-port, --grpc-port and --metrics-port, with Plinth's defaults
   8000, 8001 and 8002.

One line is printed per object checked, then every problem found, each
naming the file, the object (kind/name) and the path inside it. The exit
status is 0 only when there are no problems.

Needs `pip install kubernetes kserve` (and PyYAML, which both pull in).
"""

import difflib
import re
import sys
from pathlib import Path

import yaml

# Only the generated models of each package are used (importing kserve.models
# still runs kserve's own __init__, which loads its model server: a second).
import kserve.models as kserve_models
import kubernetes.client.models as k8s_models

# ---------------------------------------------------------------------------
# Which model class each (apiVersion, kind) loads into. Anything else fails:
# a kind this table does not know has not been checked.
# ---------------------------------------------------------------------------

KINDS = {
    ("v1", "ConfigMap"): k8s_models.V1ConfigMap,
    ("v1", "Secret"): k8s_models.V1Secret,
    ("v1", "Service"): k8s_models.V1Service,
    ("v1", "ServiceAccount"): k8s_models.V1ServiceAccount,
    ("v1", "PersistentVolumeClaim"): k8s_models.V1PersistentVolumeClaim,
    ("v1", "Namespace"): k8s_models.V1Namespace,
    ("apps/v1", "Deployment"): k8s_models.V1Deployment,
    ("apps/v1", "StatefulSet"): k8s_models.V1StatefulSet,
    ("policy/v1", "PodDisruptionBudget"): k8s_models.V1PodDisruptionBudget,
    ("autoscaling/v2", "HorizontalPodAutoscaler"): k8s_models.V2HorizontalPodAutoscaler,
    ("networking.k8s.io/v1", "NetworkPolicy"): k8s_models.V1NetworkPolicy,
    ("networking.k8s.io/v1", "Ingress"): k8s_models.V1Ingress,
    ("rbac.authorization.k8s.io/v1", "Role"): k8s_models.V1Role,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): k8s_models.V1RoleBinding,
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): kserve_models.V1alpha1ServingRuntime,
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): kserve_models.V1alpha1ClusterServingRuntime,
    ("serving.kserve.io/v1beta1", "InferenceService"): kserve_models.V1beta1InferenceService,
}

# Kinds whose pod template sits at spec.template.spec.
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
RUNTIME_KINDS = {"ServingRuntime", "ClusterServingRuntime"}

# Type names the kserve models refer to but neither package defines under
# that name, mapped to what they stand for. A type name that is neither
# defined nor listed here cannot be checked, and a manifest that uses such a
# field is refused rather than waved through.
TYPE_ALIASES = {
    "K8sIoApiAppsV1DeploymentStrategy": "V1DeploymentStrategy",
    "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior": "V2HorizontalPodAutoscalerBehavior",
    "ResourceQuantity": "str",
    "V1Time": "datetime",
}

# Plinth's flags for its three listeners and their defaults (host/src/main.rs).
PORT_FLAGS = {"http": ("--http-port", 8000), "grpc": ("--grpc-port", 8001), "metrics": ("--metrics-port", 8002)}

READY_PATH = "/v2/health/ready"
LIVE_PATH = "/v2/health/live"


class Problems:
    """Collects every problem of one object, each with the path it is at."""

    def __init__(self, where):
        self.where = where  # "file: Kind/name"
        self.items = []

    def add(self, path, message):
        self.items.append(f"{self.where}: {path or '(top)'}: {message}")


def join(path, key):
    """The JSON path of `key` (a field name or a list index) below `path`."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


# ---------------------------------------------------------------------------
# Stage 1: the typed load.
# ---------------------------------------------------------------------------

# A value the walk refused; a parent holding one is not built either, so a
# problem is reported once, where it is, and not again by every enclosing
# model's constructor.
REFUSED = object()


def resolve_class(name):
    """The model class called `name` in either package, or None."""
    for module in (kserve_models, k8s_models):
        cls = getattr(module, name, None)
        if isinstance(cls, type) and hasattr(cls, "openapi_types"):
            return cls
    return None


def split_container_type(type_name):
    """('list', item) or ('dict', value) for a container type, else None.

    The kserve models write `list[X]` and `dict(str, X)`, the kubernetes
    models `List[X]` and `Dict[str, X]`; both spellings are understood.
    """
    match = re.fullmatch(r"[Ll]ist\[(.+)\]", type_name)
    if match:
        return "list", match.group(1).strip()
    match = re.fullmatch(r"dict\(str,\s*(.+)\)", type_name) or re.fullmatch(r"Dict\[str,\s*(.+)\]", type_name)
    if match:
        return "dict", match.group(1).strip()
    return None


def describe(value):
    """A short name for a YAML value's type, for messages."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"the boolean {value!r}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return f"{type(value).__name__} {value!r}"


def check_primitive(type_name, value, path, problems):
    """Whether a leaf value fits its declared primitive type."""
    if type_name == "object":
        # Free-form (IntOrString, raw JSON, kserve's status): anything goes.
        return True
    if type_name == "str":
        ok = isinstance(value, str)
    elif type_name == "int":
        # YAML's true/false are Python ints too; they are not numbers here.
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif type_name == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif type_name == "bool":
        ok = isinstance(value, bool)
    elif type_name in ("datetime", "date"):
        # YAML turns an unquoted timestamp into a datetime; quoted, a string.
        ok = not isinstance(value, (dict, list, bool, int, float))
    elif type_name == "bytes":
        # Secret and ConfigMap binary data: base64 text in YAML.
        ok = isinstance(value, (str, bytes))
    else:
        problems.add(path, f"field type {type_name!r} is not in the installed models, so this field cannot be checked")
        return False
    if not ok:
        hint = " (quote it)" if type_name == "str" and not isinstance(value, (dict, list)) else ""
        problems.add(path, f"expected {type_name}, found {describe(value)}{hint}")
    return ok


def load(value, type_name, path, problems):
    """Walk `value` as `type_name` and return what it builds into.

    Returns the typed value (a model instance, a list, a dict or a leaf), or
    REFUSED when something in it is wrong; every such thing is added to
    `problems` with its path.
    """
    type_name = TYPE_ALIASES.get(type_name, type_name)
    if value is None:
        # An explicit null is the same as leaving the field out.
        return None

    container = split_container_type(type_name)
    if container is not None:
        shape, inner = container
        if shape == "list":
            if not isinstance(value, list):
                problems.add(path, f"expected a list, found {describe(value)}")
                return REFUSED
            items = [load(item, inner, join(path, i), problems) for i, item in enumerate(value)]
            return REFUSED if any(item is REFUSED for item in items) else items
        if not isinstance(value, dict):
            problems.add(path, f"expected a mapping, found {describe(value)}")
            return REFUSED
        entries = {}
        for key, item in value.items():
            if not isinstance(key, str):
                problems.add(path, f"key {key!r} is not a string (quote it)")
                entries[key] = REFUSED
                continue
            entries[key] = load(item, inner, join(path, key), problems)
        return REFUSED if any(item is REFUSED for item in entries.values()) else entries

    cls = resolve_class(type_name)
    if cls is None:
        return value if check_primitive(type_name, value, path, problems) else REFUSED
    return load_model(cls, value, path, problems)


def load_model(cls, value, path, problems):
    """Walk a mapping as the model class `cls`; build the instance if clean."""
    if not isinstance(value, dict):
        problems.add(path, f"expected a mapping ({cls.__name__}), found {describe(value)}")
        return REFUSED

    # attribute_map goes from the Python attribute to the YAML key; the walk
    # needs it the other way round.
    attribute_of = {yaml_key: attr for attr, yaml_key in cls.attribute_map.items()}
    children = {}
    refused = False
    for key, item in value.items():
        child_path = join(path, key)
        attr = attribute_of.get(key)
        if attr is None:
            # Suggest the nearest field, ignoring case (storageURI: storageUri).
            lowered = {name.lower(): name for name in attribute_of}
            near = difflib.get_close_matches(str(key).lower(), list(lowered), n=1)
            hint = f"; did you mean `{lowered[near[0]]}`?" if near else ""
            problems.add(child_path, f"unknown field `{key}`: not a field of {cls.__name__}{hint}")
            refused = True
            continue
        child = load(item, cls.openapi_types[attr], child_path, problems)
        if child is REFUSED:
            refused = True
        elif child is not None:
            children[attr] = child
    if refused:
        return REFUSED
    return build(cls, children, path, problems)


def build(cls, children, path, problems):
    """Construct `cls` from already typed children, reporting what it refuses."""
    if hasattr(cls, "model_validate"):
        # The kubernetes models are pydantic models (strict types, required
        # fields). Give them the YAML names; the children are instances.
        fields = {cls.attribute_map[attr]: child for attr, child in children.items()}
        try:
            return cls.model_validate(fields)
        except Exception as error:  # pydantic.ValidationError
            for detail in getattr(error, "errors", lambda: [])() or [{"loc": (), "msg": str(error)}]:
                where = path
                for part in detail.get("loc", ()):
                    where = join(where, part)
                problems.add(where, f"{cls.__name__}: {detail.get('msg')}")
            return REFUSED
    # The kserve models are plain classes whose setters check required
    # fields, raising a ValueError that names the Python attribute; it is
    # turned back into the YAML key for the path.
    try:
        return cls(**children)
    except (ValueError, TypeError) as error:
        named = re.search(r"`(\w+)`", str(error))
        where = path
        if named and named.group(1) in cls.attribute_map:
            where = join(path, cls.attribute_map[named.group(1)])
        problems.add(where, f"{cls.__name__}: {error}")
        return REFUSED


# ---------------------------------------------------------------------------
# Stage 2: the rules. These read the raw YAML, defensively, so that they
# still run (and report) on an object whose typed load failed.
# ---------------------------------------------------------------------------


def mapping(value):
    return value if isinstance(value, dict) else {}


def sequence(value):
    return value if isinstance(value, list) else []


def server_ports(container, path, problems):
    """The ports Plinth listens on, by role, read from the container's arguments.

    Both `--flag=N` and `--flag N` are understood. An argument list appended
    later (an InferenceService's args after its runtime's) is passed in as
    part of `container["args"]` by the caller.
    """
    words = [str(word) for word in sequence(container.get("command")) + sequence(container.get("args"))]
    ports = {}
    for role, (flag, default) in PORT_FLAGS.items():
        found = None
        for i, word in enumerate(words):
            if word.startswith(flag + "="):
                found = word[len(flag) + 1 :]
            elif word == flag and i + 1 < len(words):
                found = words[i + 1]
        if found is None:
            ports[role] = default
        elif found.isdigit():
            ports[role] = int(found)
        else:
            problems.add(join(path, "args"), f"{flag} is {found!r}, not a port number")
            ports[role] = default
    return ports


def probe_port(probe_action, container):
    """The port number a probe's httpGet/tcpSocket reaches, or why not."""
    port = probe_action.get("port")
    if isinstance(port, int) and not isinstance(port, bool):
        return port, None
    if isinstance(port, str):
        # A name: it must be one of the container's declared ports.
        for declared in sequence(container.get("ports")):
            declared = mapping(declared)
            if declared.get("name") == port:
                return declared.get("containerPort"), None
        return None, f"names the port {port!r}, which the container does not declare"
    return None, f"has no usable port ({port!r})"


def check_probes(container, path, ports, kserve, partial, problems):
    """Rule b: liveness, startup and readiness probes against the server's ports."""
    served = set(ports.values())

    for probe_name in ("livenessProbe", "startupProbe"):
        probe = container.get(probe_name)
        if probe is None:
            continue
        probe = mapping(probe)
        probe_path = join(path, probe_name)
        if "httpGet" in probe:
            handler = "httpGet"
        elif "tcpSocket" in probe:
            handler = "tcpSocket"
        else:
            problems.add(probe_path, "must use httpGet or tcpSocket (exec and grpc probes do not test Plinth's listeners)")
            continue
        if kserve and probe_name == "livenessProbe" and handler != "tcpSocket":
            problems.add(
                probe_path,
                "must be a tcpSocket probe under KServe: Knative moves probes onto the serving port, "
                "which speaks only HTTP/2 when the InferenceService serves gRPC",
            )
        action = mapping(probe[handler])
        number, why = probe_port(action, container)
        if why:
            problems.add(join(probe_path, f"{handler}.port"), why)
        elif number not in served:
            problems.add(join(probe_path, f"{handler}.port"), f"port {number} is not one the server listens on {sorted(served)}")
        if handler == "httpGet" and action.get("path") != LIVE_PATH:
            problems.add(join(probe_path, "httpGet.path"), f"is {action.get('path')!r}, not {LIVE_PATH} (a liveness check must not fail while models load)")

    probe = container.get("readinessProbe")
    probe_path = join(path, "readinessProbe")
    if probe is None:
        if not partial:
            problems.add(probe_path, f"missing: the server needs an httpGet readiness probe on {READY_PATH}")
        return
    action = mapping(mapping(probe).get("httpGet"))
    if not action:
        problems.add(probe_path, f"must be an httpGet probe of {READY_PATH} on the HTTP port")
        return
    if action.get("path") != READY_PATH:
        problems.add(join(probe_path, "httpGet.path"), f"is {action.get('path')!r}, not {READY_PATH}")
    number, why = probe_port(action, container)
    if why:
        problems.add(join(probe_path, "httpGet.port"), why)
    elif number != ports["http"]:
        problems.add(join(probe_path, "httpGet.port"), f"port {number} is not the HTTP port {ports['http']}")


def check_ports(container, path, ports, problems):
    """Rule c: every declared port is one the server listens on; no host ports."""
    served = set(ports.values())
    for i, declared in enumerate(sequence(container.get("ports"))):
        declared = mapping(declared)
        port_path = join(join(path, "ports"), i)
        if declared.get("containerPort") not in served:
            problems.add(join(port_path, "containerPort"), f"{declared.get('containerPort')!r} is not a port the server listens on {sorted(served)}")
        if declared.get("hostPort") is not None:
            problems.add(join(port_path, "hostPort"), "host ports are not allowed (restricted Pod Security)")


def check_security(container, path, pod_context, volumes, partial, problems):
    """Rule a: the restricted Pod Security profile, for one container.

    `pod_context` is the pod's securityContext: runAsNonRoot, runAsUser and
    seccompProfile may be set there instead. With `partial`, the container
    is a fragment merged into another (an InferenceService's model spec into
    its runtime's container): only what it sets is checked, and it must not
    weaken anything.
    """
    context = mapping(container.get("securityContext"))
    context_path = join(path, "securityContext")

    def effective(key):
        return context[key] if key in context else pod_context.get(key)

    seccomp = mapping(effective("seccompProfile")).get("type")
    if seccomp != "RuntimeDefault" and not (partial and seccomp is None):
        problems.add(join(context_path, "seccompProfile.type"), f"is {seccomp!r}, must be RuntimeDefault (on the container or the pod)")

    non_root = effective("runAsNonRoot")
    if non_root is not True and not (partial and non_root is None):
        problems.add(join(context_path, "runAsNonRoot"), f"is {non_root!r}, must be true (on the container or the pod)")

    if effective("runAsUser") == 0:
        problems.add(join(context_path, "runAsUser"), "is 0 (root)")

    escalation = context.get("allowPrivilegeEscalation")
    if escalation is not False and not (partial and escalation is None):
        problems.add(join(context_path, "allowPrivilegeEscalation"), f"is {escalation!r}, must be false")

    if context.get("privileged") is True:
        problems.add(join(context_path, "privileged"), "must not be true")

    capabilities = mapping(context.get("capabilities"))
    drop = capabilities.get("drop")
    if "ALL" not in sequence(drop) and not (partial and drop is None):
        problems.add(join(context_path, "capabilities.drop"), f"is {drop!r}, must contain ALL")
    extra = [cap for cap in sequence(capabilities.get("add")) if cap != "NET_BIND_SERVICE"]
    if extra:
        problems.add(join(context_path, "capabilities.add"), f"adds {extra}; only NET_BIND_SERVICE is allowed")

    read_only = context.get("readOnlyRootFilesystem")
    if read_only is not True and not (partial and read_only is None):
        problems.add(join(context_path, "readOnlyRootFilesystem"), f"is {read_only!r}, must be true")

    if partial:
        return
    # With a read-only root, the server's scratch space is an emptyDir at /tmp.
    empty_dirs = {mapping(v).get("name") for v in volumes if "emptyDir" in mapping(v)}
    tmp_mounts = [
        mapping(m) for m in sequence(container.get("volumeMounts")) if str(mapping(m).get("mountPath", "")).rstrip("/") == "/tmp"
    ]
    if not tmp_mounts:
        problems.add(join(path, "volumeMounts"), "nothing is mounted at /tmp: mount an emptyDir volume there")
    elif not any(m.get("name") in empty_dirs for m in tmp_mounts):
        problems.add(join(path, "volumeMounts"), "the volume mounted at /tmp is not an emptyDir")


def check_pod_level(pod, path, problems, partial=False):
    """Rule a, for the pod: no host namespaces, no host paths, a safe pod context."""
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key) is True:
            problems.add(join(path, key), "must not be true (restricted Pod Security)")
    for i, volume in enumerate(sequence(pod.get("volumes"))):
        if "hostPath" in mapping(volume):
            problems.add(join(join(path, "volumes"), i), "hostPath volumes are not allowed (restricted Pod Security)")
    context = mapping(pod.get("securityContext"))
    if context.get("runAsUser") == 0:
        problems.add(join(path, "securityContext.runAsUser"), "is 0 (root)")
    if context.get("runAsNonRoot") is False:
        problems.add(join(path, "securityContext.runAsNonRoot"), "must not be false")
    seccomp = mapping(context.get("seccompProfile")).get("type")
    if seccomp is not None and seccomp != "RuntimeDefault":
        problems.add(join(path, "securityContext.seccompProfile.type"), f"is {seccomp!r}, must be RuntimeDefault")


def check_pod(pod, path, kserve, problems, extra_args=(), extra_volumes=()):
    """Rules a, b and c on a whole pod (or a runtime's pod-like spec).

    Returns the ports the pod's containers listen on, for the Service check.
    """
    pod = mapping(pod)
    check_pod_level(pod, path, problems)
    context = mapping(pod.get("securityContext"))
    volumes = sequence(pod.get("volumes")) + list(extra_volumes)
    listening = {"numbers": set(), "names": {}}

    containers = sequence(pod.get("containers"))
    if not containers:
        problems.add(join(path, "containers"), "no containers")
    for i, container in enumerate(containers):
        container = dict(mapping(container))
        container["args"] = sequence(container.get("args")) + list(extra_args)
        container_path = join(join(path, "containers"), i)
        ports = server_ports(container, container_path, problems)
        check_security(container, container_path, context, volumes, False, problems)
        check_probes(container, container_path, ports, kserve, False, problems)
        check_ports(container, container_path, ports, problems)
        listening["numbers"].update(ports.values())
        for declared in sequence(container.get("ports")):
            declared = mapping(declared)
            if declared.get("name"):
                listening["names"][declared["name"]] = declared.get("containerPort")

    # Init containers run before the server: Pod Security applies, probes
    # and ports do not.
    for i, container in enumerate(sequence(pod.get("initContainers"))):
        check_security(mapping(container), join(join(path, "initContainers"), i), context, volumes, False, problems)
    return listening


def check_inference_service(obj, problems, runtimes):
    """The rules on an InferenceService's predictor.

    Its `model` section is merged by KServe into the runtime's container, so
    it is checked as a fragment (nothing it sets may break a rule), with the
    ports of the runtime it names and any arguments it appends. Containers
    of its own are whole containers and are checked as such.
    """
    predictor = mapping(mapping(obj.get("spec")).get("predictor"))
    path = "spec.predictor"
    check_pod_level(predictor, path, problems)

    model = mapping(predictor.get("model"))
    if model:
        model_path = join(path, "model")
        runtime_name = model.get("runtime")
        runtime = runtimes.get(runtime_name) if runtime_name else None
        sets_ports = any(key in model for key in ("ports", "livenessProbe", "readinessProbe", "startupProbe", "args"))
        if runtime_name and runtime is None:
            problems.add(join(model_path, "runtime"), f"names the runtime {runtime_name!r}, which is not among the checked manifests")
        elif runtime is not None:
            spec = mapping(runtime.get("spec"))
            # KServe merges the model spec into the runtime's container
            # called kserve-container (the first one, failing that).
            containers = [mapping(c) for c in sequence(spec.get("containers"))]
            named = [c for c in containers if c.get("name") == "kserve-container"]
            served = (named or containers or [{}])[0]
            formats = [mapping(f).get("name") for f in sequence(spec.get("supportedModelFormats"))]
            wanted = mapping(model.get("modelFormat")).get("name")
            if wanted not in formats:
                problems.add(join(model_path, "modelFormat.name"), f"{wanted!r} is not a format the runtime {runtime_name!r} supports {formats}")
            protocol = model.get("protocolVersion")
            # A runtime that lists no protocols speaks KServe's v1 only.
            if protocol is not None and protocol not in (sequence(spec.get("protocolVersions")) or ["v1"]):
                problems.add(join(model_path, "protocolVersion"), f"{protocol!r} is not a protocol the runtime {runtime_name!r} lists")
            # The merged container: the runtime's, with the model's args
            # appended and its own ports and probes where it sets them.
            merged = dict(served)
            merged["args"] = sequence(served.get("args")) + sequence(model.get("args"))
            for key in ("ports", "livenessProbe", "readinessProbe", "startupProbe"):
                if key in model:
                    merged[key] = model[key]
            ports = server_ports(merged, model_path, problems)
            fragment = dict(model)
            fragment["ports"] = merged.get("ports")
            check_probes(fragment, model_path, ports, True, True, problems)
            check_ports(fragment, model_path, ports, problems)
        elif sets_ports:
            problems.add(model_path, "sets ports, probes or args but names no runtime to check them against")
        check_security(model, model_path, mapping(predictor.get("securityContext")), [], True, problems)

    if sequence(predictor.get("containers")):
        check_pod(
            {
                "containers": predictor.get("containers"),
                "volumes": predictor.get("volumes"),
                "securityContext": predictor.get("securityContext"),
            },
            path,
            True,
            problems,
        )


def check_services(objects, pod_templates):
    """Rule c for Services: each targetPort reaches a port of the pods it selects.

    `pod_templates` holds (labels, listening) for every workload's pod
    template, `listening` being what check_pod returned for it.
    """
    for obj, problems in objects:
        if obj.get("kind") != "Service":
            continue
        spec = mapping(obj.get("spec"))
        selector = mapping(spec.get("selector"))
        if not selector:
            continue
        pods = [listening for labels, listening in pod_templates if selector.items() <= labels.items()]
        if not pods:
            problems.add("spec.selector", f"selects no pod template among the checked manifests ({selector})")
            continue
        for i, port in enumerate(sequence(spec.get("ports"))):
            port = mapping(port)
            target = port.get("targetPort", port.get("port"))
            target_path = join(join("spec.ports", i), "targetPort")
            for listening in pods:
                if isinstance(target, str):
                    if target not in listening["names"]:
                        problems.add(target_path, f"names the port {target!r}, which the selected containers do not declare")
                    elif listening["names"][target] not in listening["numbers"]:
                        problems.add(target_path, f"{target!r} is port {listening['names'][target]}, which the server does not listen on")
                elif target not in listening["numbers"]:
                    problems.add(target_path, f"port {target!r} is not one the server listens on {sorted(listening['numbers'])}")


# ---------------------------------------------------------------------------
# Reading the files.
# ---------------------------------------------------------------------------


class StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping.

    Kubernetes' strict field validation refuses duplicate fields; PyYAML on
    its own keeps the last value and says nothing.
    """

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, StrictLoader.construct_mapping)


def display(path):
    """A path relative to the working directory where it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv):
    if not argv:
        print("usage: check_manifests.py DIR [DIR ...]", file=sys.stderr)
        return 2

    files = []
    setup_problems = []
    for directory in map(Path, argv):
        if not directory.is_dir():
            setup_problems.append(f"{directory}: not a directory")
            continue
        found = sorted(p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        if not found:
            # An empty directory would make the check pass vacuously.
            setup_problems.append(f"{directory}: no *.yaml files")
        files.extend(found)

    # Every object with its problem list, for the rules that cross objects.
    objects = []
    runtimes = {}
    for file in files:
        name = display(file)
        try:
            documents = list(yaml.load_all(file.read_text(), Loader=StrictLoader))
        except yaml.YAMLError as error:
            # One line: what is wrong and where.
            mark = getattr(error, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            setup_problems.append(f"{name}: not valid YAML: {getattr(error, 'problem', None) or error}{at}")
            continue
        for index, document in enumerate(documents):
            if document is None:
                # A document of comments only (a file's header before `---`).
                continue
            if not isinstance(document, dict):
                setup_problems.append(f"{name}: document {index + 1}: not a mapping but {describe(document)}")
                continue
            kind = document.get("kind")
            object_name = mapping(document.get("metadata")).get("name")
            problems = Problems(f"{name}: {kind}/{object_name}")
            cls = KINDS.get((document.get("apiVersion"), kind))
            if cls is None:
                problems.add("kind", f"unknown apiVersion/kind {document.get('apiVersion')}/{kind}: no typed model to check it against")
            else:
                load_model(cls, document, "", problems)
            if object_name is None:
                problems.add("metadata.name", "missing")
            objects.append((document, problems))
            # ServingRuntime is namespaced and wins over a ClusterServingRuntime
            # of the same name, as in KServe.
            if kind == "ServingRuntime" or (kind == "ClusterServingRuntime" and object_name not in runtimes):
                runtimes[object_name] = document

    pod_templates = []
    for obj, problems in objects:
        kind = obj.get("kind")
        spec = mapping(obj.get("spec"))
        if kind in WORKLOAD_KINDS:
            template = mapping(spec.get("template"))
            listening = check_pod(template.get("spec"), "spec.template.spec", False, problems)
            pod_templates.append((mapping(mapping(template.get("metadata")).get("labels")), listening))
        elif kind in RUNTIME_KINDS:
            check_pod(spec, "spec", True, problems)
        elif kind == "InferenceService":
            check_inference_service(obj, problems, runtimes)
    check_services(objects, pod_templates)

    for obj, problems in objects:
        status = "FAIL" if problems.items else "ok  "
        count = f" ({len(problems.items)} problems)" if problems.items else ""
        print(f"{status} {problems.where}{count}")
    all_problems = setup_problems + [item for _, problems in objects for item in problems.items]
    if all_problems:
        print(f"\n{len(all_problems)} problems:")
        for item in all_problems:
            print(f"  {item}")
        return 1
    print(f"\nall {len(objects)} objects in {len(files)} files pass")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
