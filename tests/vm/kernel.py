"""Fetch a Debian amd64 kernel new enough for io_uring zcrx NODEV, for tests/vm/run.

Prints the path of the kernel image (vmlinuz) on stdout and progress on stderr.
The kernel comes from the machine's own Debian mirror (read from the apt
configuration), is authenticated through the signed InRelease -> Packages ->
.deb hash chain, and is unpacked with `dpkg -x` into a cache directory; it is
never installed.

Standard library only: this runs before anything of the project is built.
"""

from __future__ import annotations

import argparse
import email.utils
import functools
import glob
import hashlib
import http.client
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# Aliases rather than codenames, so the script keeps working across Debian
# releases; a mirror that lacks one of them is simply skipped.
SUITES = ("stable-backports", "testing", "unstable")
INDEX = "main/binary-amd64/Packages.xz"
RESOLVE_EVERY = 24 * 3600
HTTP_TIMEOUT = 30


class Fatal(Exception):
    """An error that must stop the run (as opposed to a suite we can skip)."""


class Untrusted(Fatal):
    """A suite whose signing key is not in the stock keyring, or not Debian's archive."""


class Offline(Exception):
    """The mirror could not be reached."""


def log(msg: str) -> None:
    print(f"vm: {msg}", file=sys.stderr, flush=True)


def require_tool(tool: str, package: str) -> str:
    """The path of ``tool``, installing ``package`` with apt-get first where it
    is missing: every machine starts fresh, and tests/vm/netdevsim/build
    fetches the kernel before tests/vm/run installs its own tools."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    found = shutil.which(tool, path=path)
    if found:
        return found
    if os.geteuid() != 0:
        raise Fatal(f"{tool} is missing: install {package} (apt-get install {package})")
    log(f"installing {package} (for {tool})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "-q", "update"], ["apt-get", "-q", "install", "-y", package]):
        done = subprocess.run(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        if done.returncode != 0:
            raise Fatal(f"{' '.join(cmd)} failed:\n{done.stdout}")
    found = shutil.which(tool, path=path)
    if not found:
        raise Fatal(f"{tool} is still missing after installing {package}")
    return found


# --------------------------------------------------------------------------- apt configuration


def _os_codename() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VERSION_CODENAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return ""


def _one_line_sources(path: str):
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            # Options in brackets ([arch=amd64 signed-by=...]) may contain spaces.
            line = re.sub(r"\[[^\]]*\]", " ", line)
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb":
                yield parts[1], [parts[2]]


def _deb822_sources(path: str):
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        for uri in fields.get("uris", "").split():
            yield uri, fields.get("suites", "").split()


def mirror_candidates() -> list[str]:
    """URIs of apt 'deb' sources that may be Debian's main archive, best first.

    Security and third-party repositories are weeded out here by suite name, and
    later for good by requiring an InRelease signed with the Debian archive key
    whose Origin is Debian.
    """
    codename = _os_codename()
    entries = []
    files = ["/etc/apt/sources.list"] if os.path.exists("/etc/apt/sources.list") else []
    files += sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
    for path in files:
        entries += list(_one_line_sources(path))
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        entries += list(_deb822_sources(path))

    ranked = []
    for uri, suites in entries:
        if not uri.startswith(("http://", "https://")):
            continue
        if not suites or any(s.endswith(("-security", "/updates")) for s in suites):
            continue
        # An entry for the host's own release is the most likely to be the archive.
        rank = 0 if codename and codename in suites else 1
        ranked.append((rank, uri.rstrip("/")))
    seen: list[str] = []
    for _, uri in sorted(ranked, key=lambda r: r[0]):
        if uri not in seen:
            seen.append(uri)
    return seen


# --------------------------------------------------------------------------- download / verify


def fetch(
    url: str, dest: str, expect_sha256: str | None = None, expect_size: int | None = None
) -> None:
    """Download url to dest atomically, checking size and SHA256 when given."""
    tmp = dest + ".part"
    digest = hashlib.sha256()
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as resp, open(tmp, "wb") as out:
            while True:
                block = resp.read(1 << 20)
                if not block:
                    break
                digest.update(block)
                size += len(block)
                out.write(block)
    except urllib.error.HTTPError:
        _unlink(tmp)
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        _unlink(tmp)
        raise Offline(f"{url}: {exc}") from exc
    if expect_size is not None and size != expect_size:
        _unlink(tmp)
        raise Fatal(f"{url}: size {size}, expected {expect_size}")
    if expect_sha256 is not None and digest.hexdigest() != expect_sha256:
        _unlink(tmp)
        raise Fatal(
            f"{url}: SHA256 {digest.hexdigest()} does not match the signed index ({expect_sha256})"
        )
    os.replace(tmp, dest)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_inrelease(path: str) -> str:
    """Check the clearsigned InRelease with gpgv; return only the signed text.

    Parsing gpgv's output rather than the file itself ignores anything an
    attacker might have put outside the signed part.
    """
    signed = path + ".verified"
    proc = subprocess.run(
        ["gpgv", "--quiet", "--status-fd", "1", "--keyring", KEYRING, "--output", signed, path],
        capture_output=True,
        text=True,
        check=False,
    )
    status = proc.stdout
    # Release files carry several signatures (one per archive key in use). As
    # apt does, one good signature is enough, provided none is bad: gpgv exits
    # non-zero when it merely lacks one of the keys.
    bad = re.search(r"\[GNUPG:\] (BADSIG|REVKEYSIG|EXPKEYSIG) ", status)
    if bad or "[GNUPG:] VALIDSIG" not in status:
        missing = re.findall(r"\[GNUPG:\] NO_PUBKEY (\S+)", status)
        if missing:
            raise Untrusted(
                f"{path}: signed by key {', '.join(missing)}, "
                f"which is not in the stock keyring {KEYRING} "
                "(a newer debian-archive-keyring package may be needed)"
            )
        raise Fatal(f"{path}: signature verification failed:\n{proc.stderr.strip()}")
    with open(signed, encoding="utf-8") as f:
        text = f.read()
    os.unlink(signed)
    return text


def parse_stanzas(text: str):
    """Yield deb822 stanzas as dicts (continuation lines joined with newlines)."""
    for block in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t"):
                if key is not None:
                    fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if fields:
            yield fields


def release_hash(release: str, name: str) -> tuple[str, int]:
    fields = next(parse_stanzas(release))
    for line in fields.get("SHA256", "").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == name:
            return parts[0], int(parts[1])
    raise Fatal(f"the signed Release has no SHA256 for {name}")


# --------------------------------------------------------------------------- kernel selection


def compare_versions(a: str, b: str) -> int:
    if a == b:
        return 0
    lt = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False).returncode == 0
    return -1 if lt else 1


_IMAGE = re.compile(r"^linux-image-(?P<krel>(?P<base>\d[^ ]*)-amd64)(?P<unsigned>-unsigned)?$")


def image_candidates(stanzas, minimum: tuple[int, int]):
    """Plain amd64-flavour kernel image packages at or above `minimum`."""
    for st in stanzas:
        m = _IMAGE.match(st.get("Package", ""))
        if not m:
            continue
        # The flavour is the last dash-separated word before -amd64: a word
        # like "cloud" or "rt" marks another flavour (cloud has no 9p), while
        # the plain flavour ends in a version or ABI number.
        last = m.group("base").rsplit("-", 1)[-1]
        if not last[:1].isdigit():
            continue
        ver = re.match(r"(\d+)\.(\d+)", m.group("base"))
        if not ver or (int(ver.group(1)), int(ver.group(2))) < minimum:
            continue
        yield m.group("krel"), bool(m.group("unsigned")), st


def payload_packages(image: dict, index: dict[str, dict], krel: str) -> list[dict]:
    """The image package plus the same-release packages it depends on.

    Newer Debian kernels split the image into linux-binary-*, linux-modules-*
    and linux-base-* with linux-image-* only a metapackage; older ones ship
    everything in linux-image-* itself. Following dependencies that carry the
    same kernel release covers both layouts.
    """
    result = [image]
    for alt in re.split(r"[,|]", image.get("Depends", "")):
        name = alt.strip().split(" ", 1)[0].split(":", 1)[0]
        if krel in name and name in index and index[name] not in result:
            result.append(index[name])
    return result


# --------------------------------------------------------------------------- cache


def ready_kernels(cache: str) -> dict[str, dict]:
    found = {}
    for marker in glob.glob(os.path.join(cache, "*", "READY")):
        try:
            with open(marker, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        # Stored relative so the cache directory can move.
        info["vmlinuz"] = os.path.join(os.path.dirname(marker), "root", info.get("image", "-"))
        if os.path.isfile(info["vmlinuz"]):
            found[info["krel"]] = info
    return found


def newest(infos):
    return max(
        infos, key=functools.cmp_to_key(lambda a, b: compare_versions(a["version"], b["version"]))
    )


def extract(
    cache: str, krel: str, pkgs: list[dict], base_uri: str, suite: str, codename: str
) -> None:
    kdir = os.path.join(cache, krel)
    os.makedirs(cache, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{krel}.", dir=cache)
    try:
        root = os.path.join(work, "root")
        os.mkdir(root)
        for st in pkgs:
            deb = os.path.join(work, os.path.basename(st["Filename"]))
            size = int(st["Size"])
            log(f"downloading {st['Package']} {st['Version']} ({size / 1e6:.1f} MB)")
            try:
                fetch(f"{base_uri}/{st['Filename']}", deb, st["SHA256"], size)
            except urllib.error.HTTPError as exc:
                raise Fatal(f"{st['Filename']}: HTTP {exc.code}") from exc
            subprocess.run(["dpkg", "-x", deb, root], check=True)
            os.unlink(deb)

        names = ", ".join(p["Package"] for p in pkgs)
        moddir = None
        for sub in ("lib/modules", "usr/lib/modules"):
            if os.path.isdir(os.path.join(root, sub, krel, "kernel")):
                moddir = os.path.join(sub, krel)
        if moddir is None:
            raise Fatal(f"no modules (lib/modules/{krel}/kernel) in {names}")
        # Older packages install the image in /boot, newer ones (7.x split
        # packages) next to the modules.
        for rel in (f"boot/vmlinuz-{krel}", f"{moddir}/vmlinuz"):
            if os.path.isfile(os.path.join(root, rel)):
                vmlinuz = rel
                break
        else:
            raise Fatal(f"no kernel image (boot/vmlinuz-{krel} or {moddir}/vmlinuz) in {names}")
        # virtme-ng locates modules at <root>/lib/modules next to the image.
        if not os.path.exists(os.path.join(root, "lib")):
            os.symlink("usr/lib", os.path.join(root, "lib"))
        # Packages leave modules.dep to their postinst, which we never run.
        depmod = require_tool("depmod", "kmod")
        subprocess.run([depmod, "-a", "-b", root, krel], check=True)

        info = {
            "krel": krel,
            "version": pkgs[0]["Version"],
            "suite": suite,
            "codename": codename,
            "packages": {p["Package"]: p["SHA256"] for p in pkgs},
            "image": vmlinuz,
        }
        with open(os.path.join(work, "READY"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        if os.path.exists(kdir):
            shutil.rmtree(kdir)
        os.replace(work, kdir)
    finally:
        if os.path.exists(work):
            shutil.rmtree(work, ignore_errors=True)


def prune(cache: str, keep: set[str]) -> None:
    """Drop kernels that are neither the chosen one nor its predecessor."""
    infos = sorted(
        ready_kernels(cache).values(),
        key=functools.cmp_to_key(lambda a, b: compare_versions(a["version"], b["version"])),
    )
    keep = set(keep) | {i["krel"] for i in infos[-2:]}
    for info in infos:
        if info["krel"] not in keep:
            log(f"removing old cached kernel {info['krel']}")
            shutil.rmtree(os.path.join(cache, info["krel"]), ignore_errors=True)
    for stale in glob.glob(os.path.join(cache, ".*.*")):
        if os.path.isdir(stale) and time.time() - os.path.getmtime(stale) > 3600:
            shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------- resolution


def signed_release(cache: str, base_uri: str, dist: str) -> tuple[str, dict] | None:
    """Verified Release text and its header for dists/<dist>, or None if absent."""
    idir = os.path.join(cache, "index", dist)
    os.makedirs(idir, exist_ok=True)
    inrelease = os.path.join(idir, "InRelease")
    try:
        fetch(f"{base_uri}/dists/{dist}/InRelease", inrelease)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise Offline(f"{base_uri}/dists/{dist}/InRelease: HTTP {exc.code}") from exc
    release = verify_inrelease(inrelease)
    head = next(parse_stanzas(release))
    # Backports carry their own Origin but the same archive signing key.
    if head.get("Origin") not in ("Debian", "Debian Backports"):
        raise Untrusted(f"{base_uri} {dist}: Origin is {head.get('Origin')!r}, not Debian")
    return release, head


def _release_date(head: dict) -> float:
    try:
        return email.utils.parsedate_to_datetime(head.get("Date", "")).timestamp()
    except (TypeError, ValueError):
        return 0.0


def load_index(cache: str, base_uri: str, suite: str) -> tuple[str, str, list[dict]] | None:
    """(codename, dist, verified stanzas) of a suite's amd64 Packages, or None if absent."""
    found = signed_release(cache, base_uri, suite)
    if found is None:
        return None
    release, head = found
    dist = suite
    codename = head.get("Codename", suite)
    # Mirrors can serve an alias (stable-backports) from an older snapshot than
    # the codename it points to (trixie-backports), so read both and keep the
    # newer.
    if codename != suite:
        by_name = signed_release(cache, base_uri, codename)
        if by_name is not None and _release_date(by_name[1]) > _release_date(head):
            release, head = by_name
            dist = codename
    sha, size = release_hash(release, INDEX)
    packages = os.path.join(cache, "index", dist, "Packages.xz")
    # The index is ~10 MB for testing/unstable: reuse it while it still matches.
    if not (os.path.exists(packages) and sha256_of(packages) == sha):
        try:
            fetch(f"{base_uri}/dists/{dist}/{INDEX}", packages, sha, size)
        except urllib.error.HTTPError as exc:
            raise Fatal(f"{dist}/{INDEX}: HTTP {exc.code}") from exc
    with lzma.open(packages, "rt", encoding="utf-8", errors="replace") as f:
        return codename, dist, list(parse_stanzas(f.read()))


def resolve(cache: str, minimum: tuple[int, int]):
    mirrors = mirror_candidates()
    if not mirrors:
        raise Fatal(
            "no http(s) Debian archive found in /etc/apt/sources.list or /etc/apt/sources.list.d/"
        )
    problems = []
    unreachable = 0
    for base_uri in mirrors:
        best = None
        for suite in SUITES:
            try:
                loaded = load_index(cache, base_uri, suite)
            except Offline as exc:
                problems.append(str(exc))
                log(f"warning: {exc}")
                # A mirror that timed out once will likely do so again: do
                # not wait out the timeout for every suite.
                unreachable += 1
                break
            except Untrusted as exc:
                # A suite signed by a key we do not have is unusable, but the
                # others may still provide a kernel. A bad signature, by
                # contrast, is a Fatal that stops everything.
                problems.append(str(exc))
                log(f"warning: skipping {suite}: {exc}")
                continue
            if loaded is None:
                log(f"{base_uri}: no suite {suite}")
                continue
            codename, dist, stanzas = loaded
            index = {st["Package"]: st for st in stanzas if "Package" in st}
            for krel, unsigned, st in image_candidates(stanzas, minimum):
                # Prefer the newest version; on a tie prefer the signed package.
                key = (st["Version"], not unsigned)
                if best is None or _better(key, best[0]):
                    best = (key, krel, st, index, dist, codename)
        if best is not None:
            return base_uri, best
    if unreachable == len(mirrors):
        raise Offline("; ".join(problems))
    raise Fatal(
        f"no linux-image-*-amd64 >= {minimum[0]}.{minimum[1]} "
        f"in {', '.join(SUITES)} of {', '.join(mirrors)}"
        + (f" ({'; '.join(problems)})" if problems else "")
    )


def _better(key, than) -> bool:
    c = compare_versions(key[0], than[0])
    return c > 0 or (c == 0 and key[1] and not than[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", required=True, help="cache directory for kernels and indexes")
    ap.add_argument("--min", default="7.1", help="minimum kernel version (major.minor)")
    ap.add_argument(
        "--refresh", action="store_true", help="re-read the mirror even if checked recently"
    )
    args = ap.parse_args()
    major, minor = (int(x) for x in args.min.split(".")[:2])
    cache = os.path.abspath(args.cache)
    os.makedirs(cache, exist_ok=True)
    state_path = os.path.join(cache, "resolved.json")

    cached = ready_kernels(cache)
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = {}
    fresh = time.time() - state.get("time", 0) < RESOLVE_EVERY
    if not args.refresh and fresh and state.get("krel") in cached:
        info = cached[state["krel"]]
        log(f"kernel {_describe(info)}, cached; mirror checked {_age(state['time'])} ago")
        print(info["vmlinuz"])
        return 0

    try:
        base_uri, (_, krel, image, index, suite, codename) = resolve(cache, (major, minor))
    except Offline as exc:
        usable = [i for i in cached.values() if _at_least(i["krel"], (major, minor))]
        if not usable:
            raise Fatal(f"cannot reach the Debian mirror and no kernel is cached: {exc}") from exc
        info = newest(usable)
        log(f"warning: mirror unreachable; using cached kernel {_describe(info)}")
        # Do not wait on an unreachable mirror again for every run today.
        _save_state(state_path, info["krel"])
        print(info["vmlinuz"])
        return 0

    info = cached.get(krel)
    if info is not None and info["version"] == image["Version"]:
        log(f"kernel {_describe(info)}, cached")
    else:
        log(f"kernel {krel} ({image['Version']}) from {codename} of {base_uri}: downloading")
        started = time.monotonic()
        extract(cache, krel, payload_packages(image, index, krel), base_uri, suite, codename)
        info = ready_kernels(cache)[krel]
        log(f"kernel {krel} unpacked in {time.monotonic() - started:.0f} s")
    _save_state(state_path, krel)
    prune(cache, {krel})
    print(info["vmlinuz"])
    return 0


def _save_state(path: str, krel: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"time": time.time(), "krel": krel}, f)
    os.replace(path + ".tmp", path)


def _at_least(krel: str, minimum: tuple[int, int]) -> bool:
    m = re.match(r"(\d+)\.(\d+)", krel)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= minimum


def _describe(info: dict) -> str:
    return f"{info['krel']} ({info['version']}, {info['codename']})"


def _age(t: float) -> str:
    s = int(time.time() - t)
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Fatal as exc:
        log(f"error: {exc}")
        sys.exit(1)
