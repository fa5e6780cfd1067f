#!/usr/bin/env python3
"""Check web/openapi.json against the warp router.

1. Validates the document as OpenAPI (openapi-spec-validator: `pip install openapi-spec-validator`).
2. Extracts every (method, path) the router serves from src/http/{mod,ops,live,images,nodes,lifecycle,agent,agent_upload,gateway,pages,migrations,moves}.rs
   and checks that the document describes exactly those operations; that exactly the routes
   that read the Authorization header (`auth()`) carry a security requirement; and that
   exactly those whose handler checks the admin token (`require_admin`) carry `bearerAuth`
   (the others that read the header take another token: a join token, a node credential).

The extraction is a plain regex reading of the code as it is written: each `let NAME = EXPR;`
whose EXPR contains `warp::get()/post()/put()/patch()/delete()` is a route. Its path is the path of the
`let` it starts from (`pools`, `base()`), then `warp::path("x")` and `warp::path!(a / b / String)`
segments in order (`String` is a parameter); `warp::path!(...).or(warp::path::end())` serves
both that path and `/`. A function whose returned expression (outside any `let`) names a
method is one route of its own (`agent.rs`). A route on `warp::method()` serves the methods its
handler matches on (`Method::GET => …`). A route whose path has a segment the regex cannot
read (`warp::path(segment)` with a variable, `warp::path::param()`) takes its path from its
`timed("…")` label instead, where `{a,b}` lists alternatives (`/api/v1/migration-{sources,destinations}`). Path parameters are compared by position only
(`{pool}` == `{id}`). A route is an admin route when its handler (`timed("…", [module::]f(…))`,
or the route's own text) calls `require_admin`, directly or through a function that does.
The CORS preflight (OPTIONS on any path) is not a route of its own.

Usage: python3 scripts/check-openapi.py   (from anywhere; exits 1 listing every mismatch)
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "web" / "openapi.json"
HTTP = ROOT / "src" / "http"
ROUTER_FILES = [
    HTTP / f for f in ("mod.rs", "ops.rs", "live.rs", "images.rs", "nodes.rs", "lifecycle.rs", "agent.rs", "agent_upload.rs", "gateway.rs", "pages.rs", "migrations.rs", "moves.rs")
]
METHODS = ("get", "post", "put", "patch", "delete")

LET = re.compile(r"\blet\s+(?:mut\s+)?(\w+)\s*=\s*(.*?);", re.S)
FN = re.compile(r"^(?:pub(?:\([^)]*\))?\s+)?(?:async\s+)?fn\s+\w+", re.M)
SEGMENT = re.compile(r'warp::path\("([^"]*)"\)|warp::path!\(([^)]*)\)|warp::path::end\(\)')
METHOD = re.compile(r"warp::(get|post|put|patch|delete)\(\)")
PATH_OR_END = re.compile(r"warp::path!\(([^)]*)\)\s*\.or\(\s*warp::path::end\(\)\s*\)")
FN_NAME = re.compile(r"fn\s+(\w+)")
HANDLER = re.compile(r'timed\(\s*"[^"]*"\s*,\s*(?:(\w+)::)?(\w+)\(')
USE_AS = re.compile(r"\buse\s+(\w+)\s+as\s+(\w+)\s*;")
ANY_METHOD = re.compile(r"warp::method\(\)")
DISPATCH = re.compile(r"\bMethod::(GET|POST|PUT|PATCH|DELETE)\b")
OPAQUE = re.compile(r"warp::path\(\s*[A-Za-z_]\w*\s*\)|warp::path::param\b")
LABEL = re.compile(r'timed\(\s*"([^"]*)"')
ALTERNATIVES = re.compile(r"\{([^{}]*,[^{}]*)\}")


def functions(src):
    """[(name, body)] of the top-level functions of a source file (a body runs to the next one)."""
    starts = [m.start() for m in FN.finditer(src)] + [len(src)]
    return [(FN_NAME.search(src[a:b]).group(1), src[a:b]) for a, b in zip(starts, starts[1:])]


def admin_functions():
    """{file stem: names of its functions that call `require_admin`, directly or via another}."""
    out = {}
    for f in HTTP.glob("*.rs"):
        fns = functions(f.read_text())
        admin, callees = set(), {"require_admin"}
        while True:
            # Not `.name(`: a method of another type that shares a name (`hive.migrations()`).
            call = re.compile(r"(?<!\.)\b(%s)\(" % "|".join(sorted(callees)))
            more = {n for n, body in fns if n not in admin and call.search(body)}
            if not more:
                break
            admin |= more
            callees |= more
        out[f.stem] = admin
    return out


def is_admin(expr, src, stem, admin_fns):
    """Does the route (its text `expr`, in file `stem`) check the admin token?"""
    if "require_admin(" in expr:
        return True
    m = HANDLER.search(expr)
    if not m:
        return False
    module, name = m.groups()
    if module:
        aliases = {alias: real for real, alias in USE_AS.findall(src)}
        module = aliases.get(module, module)
        if module == "super":
            module = "mod"
    return name in admin_fns.get(module or stem, set())


def macro_segments(args):
    out = []
    for part in args.split("/"):
        part = part.strip()
        if not part:
            continue
        if part.startswith('"') and part.endswith('"'):
            out.append(part[1:-1])
        else:  # a typed segment such as String or u64
            out.append("{}")
    return out


def dispatched(expr, fns):
    """Methods a `warp::method()` route's handler matches on, in order of first mention."""
    m = HANDLER.search(expr)
    body = fns.get(m.group(2), "") if m else ""
    return list(dict.fromkeys(x.lower() for x in DISPATCH.findall(body)))


def label_segments(expr):
    """Segment lists of a route's `timed("…")` label, `{a,b}` expanded; None without a label."""
    m = LABEL.search(expr)
    if not m:
        return None
    paths, done = [m.group(1)], []
    while paths:
        p = paths.pop()
        a = ALTERNATIVES.search(p)
        if a:
            paths += [p[: a.start()] + alt.strip() + p[a.end() :] for alt in a.group(1).split(",")]
        else:
            done.append(p)
    return [["{}" if s.startswith("{") else s for s in p.strip("/").split("/")] for p in done]


def segments_of(expr, env):
    """Alternative segment lists an expression matches (more than one only with `.or(path::end())`)."""
    head = re.match(r"\s*(\w+)\s*(\(\s*\))?", expr)
    prefix = env.get(head.group(1), [[]]) if head else [[]]
    alts = []
    m = PATH_OR_END.search(expr)
    if m:
        alts = [macro_segments(m.group(1)), []]
        expr = expr[: m.start()] + expr[m.end():]
    own = []
    for lit, macro in (x.groups() for x in SEGMENT.finditer(expr)):
        if lit is not None:
            own.append(lit)
        elif macro is not None:
            own.extend(macro_segments(macro))
    if not alts:
        alts = [[]]
    return [p + own + a for p in prefix for a in alts]


def router_routes():
    """{(method, path): (reads_token, admin)} from the router source."""
    routes, problems = {}, []
    admin_fns = admin_functions()
    for f in ROUTER_FILES:
        src = f.read_text()
        fns = dict(functions(src))
        for _, body in functions(src):
            env, opaque = {}, set()
            outside, pos = [], 0
            for m in LET.finditer(body):
                outside.append(body[pos : m.start()])
                pos = m.end()
                name, expr = m.group(1), m.group(2)
                methods = METHOD.findall(expr)
                segs = segments_of(expr, env)
                head = re.match(r"\s*(\w+)", expr)
                unreadable = bool(OPAQUE.search(expr)) or bool(head and head.group(1) in opaque)
                if not methods and ANY_METHOD.search(expr):
                    methods = dispatched(expr, fns)
                    if not methods:
                        problems.append(f"{f.name}: route `{name}` takes any method but its handler matches none; cannot read it")
                        continue
                elif not methods:
                    if SEGMENT.search(expr) or (head and head.group(1) in env):
                        env[name] = segs
                        if unreadable:
                            opaque.add(name)
                    continue
                elif len(set(methods)) != 1:
                    problems.append(f"{f.name}: route `{name}` has several methods {methods}; cannot read it")
                    continue
                if not re.search(r"\b%s\b" % re.escape(name), body[m.end():]):
                    problems.append(f"{f.name}: route `{name}` is defined but never mounted")
                    continue
                if unreadable:
                    segs = label_segments(expr)
                    if segs is None:
                        problems.append(f"{f.name}: route `{name}` has a path segment the script cannot read and no timed(\"…\") label")
                        continue
                flags = ("auth()" in expr, is_admin(expr, src, f.stem, admin_fns))
                for method in dict.fromkeys(methods):
                    add(routes, problems, f, method, segs, flags)
            # The function's returned expression, when it is a route itself.
            tail = "".join(outside) + body[pos:]
            methods = METHOD.findall(tail)
            if len(set(methods)) == 1:
                segs = segments_of(tail[SEGMENT.search(tail).start() :] if SEGMENT.search(tail) else "", {})
                add(routes, problems, f, methods[0], segs, ("auth()" in tail, is_admin(tail, src, f.stem, admin_fns)))
            elif methods:
                problems.append(f"{f.name}: a returned route has several methods {methods}; cannot read it")
    return routes, problems


def add(routes, problems, f, method, segs, flags):
    for s in segs:
        key = (method, "/" + "/".join(s))
        if key in routes:
            problems.append(f"{f.name}: {key[0].upper()} {key[1]} is defined twice")
        routes[key] = flags


def normalize(path):
    return re.sub(r"\{[^}]*\}", "{}", path)


def doc_routes(doc):
    out = {}
    global_sec = doc.get("security")
    for path, item in doc.get("paths", {}).items():
        for method in METHODS + ("head", "options", "trace"):
            if method in item:
                op = item[method]
                sec = op.get("security", global_sec) or []
                out[(method, normalize(path))] = (path, any(s for s in sec), any("bearerAuth" in s for s in sec))
    return out


def main():
    errors = []
    doc = json.loads(DOC.read_text())
    try:
        from openapi_spec_validator import validate
    except ImportError:
        print("openapi-spec-validator is missing: pip install openapi-spec-validator", file=sys.stderr)
        return 2
    try:
        validate(doc)
    except Exception as e:  # the validator's own error types vary by version
        errors.append(f"invalid OpenAPI document: {e}")

    routes, problems = router_routes()
    errors += problems
    if not routes:
        errors.append("no routes found in the router source: the extraction regex needs updating")
    documented = doc_routes(doc)
    for key in sorted(set(routes) - set(documented)):
        errors.append(f"served but not documented: {key[0].upper()} {key[1]}")
    for key in sorted(set(documented) - set(routes)):
        errors.append(f"documented but not served: {key[0].upper()} {documented[key][0]}")
    for key in sorted(set(routes) & set(documented)):
        (token, admin), (path, secured, bearer) = routes[key], documented[key]
        name = f"{key[0].upper()} {path}"
        if token and not secured:
            errors.append(f"route reads Authorization but the document gives it no security: {name}")
        if secured and not token:
            errors.append(f"security on a route that takes no token: {name}")
        if admin and not bearer:
            errors.append(f"admin route without bearerAuth in the document: {name}")
        if bearer and not admin:
            errors.append(f"bearerAuth on a route that does not check the admin token: {name}")

    if errors:
        print("\n".join(errors), file=sys.stderr)
        print(f"FAIL: {len(errors)} problem(s)", file=sys.stderr)
        return 1
    n_admin = sum(admin for _, admin in routes.values())
    print(f"ok: {len(routes)} operations on {len({p for _, p in routes})} paths match the router ({n_admin} admin)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
