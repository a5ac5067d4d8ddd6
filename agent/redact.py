"""Redaction of secrets in command lines, environments and free text, before anything is stored or printed.

The agent runs as root on production hosts; profiles get shipped around and /metrics is scraped, so
every command line (``/proc/PID/cmdline``), exec'd argv, environment and log-ish string passes through
here first. Secrets become ``<redacted>``; the flag or key name stays, so the profile still says *that*
a password was passed, never *which*.

Rules (all table-tested in ``tests/test_redact.py``):

* **Secret-ish names** (flags ``--db-password``, keys ``password=``, ``PGPASSWORD=``, Java
  ``-Dx.keyStorePassword=``): the name, split on ``-_.`` and camelCase, contains ``password``,
  ``passwd``, ``passphrase``, ``pwd``, ``secret``, ``token`` (not ``tokenizer``/``tokens``),
  ``apikey``/``api-key``/``api_key``, ``credential``, ``bearer``, ``private-key``, ``access-key``,
  ``auth-key``; or has a segment ``pass``, ``pw``, ``auth`` or ``authorization``; or ends in the
  segment ``key``. Not secret-ish: ``--author``, ``--authority``, ``--authentication-database``
  (``auth`` must be a whole segment), ``--passive``, ``--bypass``, ``PWD``/``OLDPWD``; names that
  *describe* a secret rather than carry it, i.e. ending in ``file``, ``path``, ``dir``, ``type``,
  ``method``, ``mechanism``, ``source``, ``stdin``, ``prompt``, ``env``, ``name``, ``url``, ``user``,
  ``ttl`` ... (``--password-file /etc/x`` keeps its path: a file path is not a secret); boolean
  switches starting ``no-``, ``ask-``, ``skip-``, ``prompt-``, ``require-`` ... (``--no-password``).
* A secret-ish flag's value is redacted in both ``--flag=value`` and ``--flag value`` forms; a
  following argument that looks like another flag is not taken as the value (so a password starting
  with ``-x`` would leak: accepted); nor is a switch word (``yes``, ``no``, ``true``, ``none`` ...:
  ``PasswordAuthentication=no`` stays). Names of the password family (``pass``, ``pwd``, ``password``,
  ``passphrase``) always lose their value; others (``--private-key``, ``--token``, ``--credentials``)
  keep a value that is plainly a file path (``/...``, ``./...``, ``~/...``, ``@/...``).
* Program-specific short options, by the basename of any earlier argument: mysql/mariadb clients
  ``-pSECRET`` (attached only: ``mysql -p db`` prompts, and ``-p 3306`` of nginx/ssh/python is a
  port and stays); mongo tools and ``sshpass`` ``-p SECRET``/``-pSECRET``; ``redis-cli -a SECRET``;
  curl ``-u/--user/-U/--proxy-user user:SECRET`` (the user stays).
* Value patterns, anywhere in any argument and in free text (:func:`redact_text`): ``user:pass@`` in
  URLs of any scheme; ``Authorization:``/``Proxy-Authorization:`` header values and bare
  ``Bearer xxx``; secret-named header/YAML/JSON keys (``X-Api-Key: v``, ``"password": "v"``);
  ``Cookie:`` values; AWS access key ids (``AKIA``/``ASIA`` + 16) and ``aws_secret_access_key``
  values; GitHub (``ghp_`` ..., ``github_pat_``), GitLab (``glpat-``), Slack (``xox[abpors]-``),
  Stripe (``sk_live_``), Google (``AIza``) tokens; JWTs (``eyJ...eyJ...``); PEM private key blocks
  (also truncated ones); ``KEY=VALUE`` assignments with a secret-ish key (so ``sh -c "PGPASSWORD=x
  psql"`` and ``mount -o user=a,password=b`` are covered) including query strings
  (``?password=``, ``&access_token=``, ``sig=``, ``signature=``); and in multi-word strings
  ``--secret-flag value`` plus the program-specific rules above.

Bounds: at most :data:`MAX_ARGS` arguments (the rest are summarised in one ``<N more arguments>``
element), each argument considered up to :data:`MAX_INPUT_CHARS` and stored up to
:data:`MAX_ARG_CHARS` (cut after redaction, so a cut never exposes part of a secret). Bytes are decoded
with ``surrogateescape``. No function here raises: on an internal error the result fails closed
(everything redacted).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

REDACTED = "<redacted>"

MAX_ARGS = 1024  # arguments kept per command line
MAX_INPUT_CHARS = 131072  # per argument, what the kernel allows (MAX_ARG_STRLEN); the rest is cut first
MAX_ARG_CHARS = 16384  # per argument, what is kept after redaction
MAX_TEXT_CHARS = 1 << 20  # free text considered by redact_text
TRUNCATED = "...<truncated>"

# Environment variables whose values are kept (after redact_text); every other value is dropped and
# only the name is kept. LC_* is matched by prefix.
ENV_ALLOWLIST = frozenset((
    # locale, identity of the session, shell
    "PATH", "LANG", "LANGUAGE", "TZ", "HOME", "USER", "LOGNAME", "SHELL", "PWD", "TERM", "HOSTNAME",
    "TMPDIR", "TMP", "TEMP", "UMASK", "container", "DEBIAN_FRONTEND",
    "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME",
    # dynamic linker, allocators
    "LD_LIBRARY_PATH", "LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_CONF", "GLIBC_TUNABLES",
    # systemd-provided
    "INVOCATION_ID", "JOURNAL_STREAM", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_FDNAMES",
    "RUNTIME_DIRECTORY", "STATE_DIRECTORY", "CACHE_DIRECTORY", "LOGS_DIRECTORY",
    "CONFIGURATION_DIRECTORY", "CREDENTIALS_DIRECTORY", "WATCHDOG_USEC",
    # language runtimes
    "JAVA_HOME", "JRE_HOME", "CATALINA_HOME", "CATALINA_BASE", "JAVA_OPTS", "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS", "JVM_OPTS", "CATALINA_OPTS", "MAVEN_OPTS", "CLASSPATH",
    "PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING",
    "VIRTUAL_ENV", "DJANGO_SETTINGS_MODULE", "FLASK_APP", "FLASK_ENV", "WSGI_MODULE",
    "NODE_ENV", "NODE_PATH", "NODE_OPTIONS", "NODE_EXTRA_CA_CERTS", "NPM_CONFIG_PREFIX",
    "GOMAXPROCS", "GOMEMLIMIT", "GOGC", "GODEBUG", "GOPATH", "GOROOT",
    "RUBYLIB", "GEM_HOME", "GEM_PATH", "BUNDLE_GEMFILE", "RAILS_ENV", "RACK_ENV",
    "PERL5LIB", "DOTNET_ROOT", "ASPNETCORE_ENVIRONMENT", "ASPNETCORE_URLS",
    "APP_ENV", "ENVIRONMENT", "ENV", "PORT",
    # TLS trust and proxies (proxy URLs go through redact_text: credentials in them are removed)
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "all_proxy",
    # orchestration
    "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBERNETES_PORT", "POD_NAME",
    "POD_NAMESPACE", "NODE_NAME",
))
_ENV_ALLOW_PREFIXES = ("LC_",)

# ------------------------------------------------------------------------------ secret names
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_SEGMENTS = re.compile(r"[^a-z0-9]+")
# Password family: the value is always redacted, even when it looks like a path.
_PASSWORD_WORDS = re.compile(r"passw(?:or)?d|passphrase|pwd")
_SECRET_WORDS = re.compile(
    r"secret|token(?!izer|s(?:[^a-z]|$))|api[-_.]?key|credential|bearer|private[-_.]?key"
    r"|access[-_.]?key|auth[-_.]?key|signing[-_.]?key|encryption[-_.]?key|session[-_.]?key")
_PASSWORD_SEGMENTS = frozenset(("pass", "pw", "passw"))
_SECRET_SEGMENTS = frozenset(("auth", "authorization", "authtoken", "authkey"))
_NOT_SECRET_NAMES = frozenset(("pwd", "oldpwd", "passive", "bypass", "keyword", "keywords"))
# A first segment that makes the name a boolean switch, not a carrier.
_SWITCH_PREFIXES = frozenset(("no", "skip", "ask", "prompt", "without", "disable", "enable",
                              "require", "allow", "show", "hide", "read", "use"))
# A last segment that makes the name describe a secret rather than carry it.
_DESCRIBING_SUFFIXES = frozenset((
    "file", "files", "path", "paths", "dir", "dirs", "directory", "location", "loc", "type", "types",
    "method", "methods", "mechanism", "mode", "source", "src", "plugin", "provider", "backend",
    "helper", "stdin", "prompt", "fd", "env", "var", "name", "names", "url", "uri", "endpoint", "host",
    "port", "user", "username", "length", "len", "ttl", "timeout", "expiry", "expiration", "lifetime",
    "policy", "required", "command", "cmd", "program", "script", "store", "db", "database",
    "through", "sock", "socket", "format", "encoding", "algorithm", "algo", "size", "bits",
    "min", "max", "count", "interval", "header", "realm", "scheme", "version", "authentication",
))

NOT_SECRET, SECRET, PASSWORD = 0, 1, 2


@lru_cache(maxsize=8192)
def secret_class(name: str) -> int:
    """How secret-ish a flag or key name is: NOT_SECRET (0), SECRET (1, a plain path value is kept)
    or PASSWORD (2, the value always goes). Leading dashes and a Java ``-D`` prefix are ignored."""
    if name.startswith("-"):
        bare = name.lstrip("-")
        if len(name) - len(bare) == 1 and bare[:1] == "D" and len(bare) > 1:
            bare = bare[1:]  # -Dfoo.password
    else:
        bare = name
    low = _CAMEL.sub(r"\1-\2", bare).lower()
    if not low or low in _NOT_SECRET_NAMES:
        return NOT_SECRET
    segs = [s for s in _SEGMENTS.split(low) if s]
    if not segs:
        return NOT_SECRET
    if segs[0] in _SWITCH_PREFIXES and len(segs) > 1:
        return NOT_SECRET
    if len(segs) > 1 and segs[-1] in _DESCRIBING_SUFFIXES:
        return NOT_SECRET
    if _PASSWORD_WORDS.search(low) or any(s in _PASSWORD_SEGMENTS for s in segs):
        return PASSWORD
    if _SECRET_WORDS.search(low) or any(s in _SECRET_SEGMENTS for s in segs) or segs[-1] == "key":
        return SECRET
    return NOT_SECRET


# Values that are a setting, not a secret (--auth=none, PasswordAuthentication=no).
_SWITCH_VALUES = frozenset(("yes", "no", "true", "false", "on", "off", "none", "null", "disabled",
                            "enabled", "required", "optional"))
_PATHLIKE = re.compile(r"^@?(?:/|\./|\.\./|~/)[^\s]*$")


def _keeps_value(cls: int, value: str) -> bool:
    """Whether a secret-named value is kept anyway (empty, or a path for non-password names)."""
    if not value:
        return True
    if value == REDACTED or value.lower() in _SWITCH_VALUES:
        return True
    return cls == SECRET and bool(_PATHLIKE.match(value)) and "-----BEGIN" not in value


# ------------------------------------------------------------------------- value patterns
_PEM = re.compile(
    r"(-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----)(.*?)(-----END (?:[A-Z0-9]+ )*PRIVATE KEY"
    r"(?: BLOCK)?-----|\Z)", re.S)
# The password part may hold unencoded '?', '#' and '@' (seen in the wild); it ends at the last '@'
# before a '/', whitespace or quote.
_URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]{0,30}://[^:/?#@\s\"']*):([^/\s\"']*)@")
_AUTH_HEADER = re.compile(
    r"(?i)(\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)"
    r"(?:(bearer|basic|token|bot|apikey|api-key|key|sso-key|otp)(\s+)(\S+?)(?=[\"']|\s|$)"
    r"|([^\s\"'][^\r\n\"']*))")
_BEARER = re.compile(r"(?i)\b(bearer\s+)([A-Za-z0-9._~+/=\-]{8,})")
_COOKIE = re.compile(r"(?i)(?<![\w-])((?:set-)?cookie\s*:\s*)([^\r\n\"']+)")
_SECRET_HEADER = re.compile(
    r"(?i)(?<![\w.-])([\w.-]{0,40}?(?:api-?key|token|secret|password|passwd|signature|credential)[\w.-]{0,40}"
    r"[\"']?\s*:(?:\s+[\"']?|[\"']))([^\s\"',;}]+)")
_TOKENS = re.compile(
    r"\b(?:(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{20,}"
    r"|glpat-[A-Za-z0-9_\-]{20,}"
    r"|xox[abpors]-[A-Za-z0-9\-]{10,}"
    r"|[sr]k_live_[A-Za-z0-9]{16,}"
    r"|AIza[0-9A-Za-z_\-]{35}"
    r"|eyJ[A-Za-z0-9_\-]{5,}\.eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]*)")
_AWS_SECRET = re.compile(
    r"(?i)((?:aws_secret_access_key|aws_secret_key|secret_access_key|secretaccesskey)[\"']?\s*[:=]\s*"
    r"[\"']?)([A-Za-z0-9/+=]{40})")
# key=value anywhere; an unquoted value ends at whitespace, '&', ';', a quote, or ",next=" (so
# "mount -o a=1,password=x,b=2" works); ',' and '#' are otherwise part of it (PGPASSWORD=a#b,c).
_KV = re.compile(
    r"(?<![\w.\-])(-{0,2}[A-Za-z_][\w.\-]{0,120})(=)"
    r"(\"[^\"\n]*\"|'[^'\n]*'|[^\s&;,\"'=](?:[^\s&;,\"']|,(?![A-Za-z_][\w.\-]{0,120}=))*)")
# In a query string or fragment the value also ends at '#'.
_QUERY_KV = re.compile(r"([?&#])([A-Za-z_][\w.\-]{0,120})=([^&#\s\"']*)")
_QUERY_SECRET_NAMES = frozenset(("sig", "signature", "x-amz-signature", "x-goog-signature", "code"))
_SPACED_FLAG = re.compile(r"(?<!\S)(--?[A-Za-z][\w.\-]{0,120})([ \t]+)(\"[^\"]*\"|'[^']*'|[^\s\"'\-][^\s\"']*)")

# Quick test whether a string can hold anything redact_text would change.
_MAYBE = re.compile(
    r"[=:]|-----BEGIN|AKIA|ASIA|gh[pousr]_|github_pat_|glpat-|xox[abpors]-|eyJ|[sr]k_live_|AIza"
    r"|(?i:bearer)|(?<!\S)-[^\s]*[ \t]")

# Program families with their own short options.
_MYSQL = frozenset((
    "mysql", "mysqldump", "mysqladmin", "mysqlimport", "mysqlshow", "mysqlcheck", "mysqlpump",
    "mysqlslap", "mysqlbinlog", "mysql_upgrade", "mysqlsh", "mariadb", "mariadb-dump",
    "mariadb-admin", "mariadb-import", "mariadb-show", "mariadb-check", "mariadb-slap",
    "mariadb-binlog", "mariadb-upgrade", "mariadb-backup", "mariabackup", "mysql_secure_installation"))
_MONGO = frozenset(("mongo", "mongosh", "mongodump", "mongorestore", "mongoexport", "mongoimport",
                    "mongostat", "mongotop", "mongofiles"))
_ATTACHED, _SEPARATE, _USERPASS = 1, 2, 4
# family -> option -> how its value is given (bit set of _ATTACHED/_SEPARATE, or _USERPASS)
_FAMILY_OPTS: Dict[str, Dict[str, int]] = {
    "mysql": {"-p": _ATTACHED},
    "mongo": {"-p": _ATTACHED | _SEPARATE},
    "sshpass": {"-p": _ATTACHED | _SEPARATE},
    "redis-cli": {"-a": _ATTACHED | _SEPARATE},
    "curl": {"-u": _USERPASS, "-U": _USERPASS, "--user": _USERPASS, "--proxy-user": _USERPASS},
}
# In free text: (program regex, option regex); group 1 kept, group 2 redacted.
_FAMILY_TEXT = (
    (re.compile(r"(?<![\w\-])(?:mysql[\w\-]*|mariadb[\w\-]*)\b"), re.compile(r"(?<!\S)(-p)([^\s\"']+)")),
    (re.compile(r"(?<![\w\-])(?:mongo[a-z]*|sshpass)\b"),
     re.compile(r"(?<!\S)(-p[ \t]*)([^\s\"'\-][^\s\"']*)")),
    (re.compile(r"(?<![\w\-])redis-cli\b"), re.compile(r"(?<!\S)(-a[ \t]*)([^\s\"'\-][^\s\"']*)")),
    (re.compile(r"(?<![\w\-])curl\b"),
     re.compile(r"(?<!\S)((?:-u|-U|--user|--proxy-user)(?:[ \t]+|=)?[^\s:\"']*:)([^\s\"']+)")),
)


def _family(arg: str) -> Optional[str]:
    base = arg.rsplit("/", 1)[-1]
    if base in _MYSQL:
        return "mysql"
    if base in _MONGO:
        return "mongo"
    if base in ("sshpass", "redis-cli", "curl"):
        return base
    return None


# ------------------------------------------------------------------------------- free text
def _redacts(name: str, value: str) -> bool:
    """Whether ``name=value`` / ``--name value`` (value maybe quoted) loses its value."""
    if value.startswith(REDACTED):
        return False  # done by the query-string pass
    cls = secret_class(name)
    if cls == NOT_SECRET:
        return False
    inner = value[1:-1] if value[:1] in "\"'" and len(value) >= 2 else value
    return not _keeps_value(cls, inner)


def _kv_sub(m: "re.Match[str]") -> str:
    name, value = m.group(1), m.group(3)
    if not _redacts(name, value):
        return m.group(0)
    if value[:1] in "\"'":
        return name + "=" + value[0] + REDACTED + value[0]
    return name + "=" + REDACTED


def _query_sub(m: "re.Match[str]") -> str:
    name, value = m.group(2), m.group(3)
    cls = secret_class(name)
    if cls == NOT_SECRET:
        if name.lower() not in _QUERY_SECRET_NAMES:
            return m.group(0)
        cls = PASSWORD
    if _keeps_value(cls, value):
        return m.group(0)
    return m.group(1) + name + "=" + REDACTED


def _flag_sub(m: "re.Match[str]") -> str:
    name, value = m.group(1), m.group(3)
    if not _redacts(name, value):
        return m.group(0)
    return name + m.group(2) + REDACTED


def _auth_sub(m: "re.Match[str]") -> str:
    if m.group(2):
        return m.group(1) + m.group(2) + m.group(3) + REDACTED
    return m.group(1) + REDACTED


def _redact_text(s: str) -> str:
    if not _MAYBE.search(s):
        return s
    s = _PEM.sub(lambda m: m.group(1) + REDACTED + m.group(3), s)
    s = _URL_USERINFO.sub(lambda m: m.group(1) + ":" + REDACTED + "@", s)
    s = _AUTH_HEADER.sub(_auth_sub, s)
    s = _BEARER.sub(lambda m: m.group(1) + REDACTED, s)
    s = _COOKIE.sub(lambda m: m.group(1) + REDACTED, s)
    s = _TOKENS.sub(REDACTED, s)
    s = _AWS_SECRET.sub(lambda m: m.group(1) + REDACTED, s)
    s = _SECRET_HEADER.sub(
        lambda m: m.group(0) if m.group(2).startswith(REDACTED) else m.group(1) + REDACTED, s)
    if "=" in s:
        s = _QUERY_KV.sub(_query_sub, s)
        s = _KV.sub(_kv_sub, s)
    if " " in s or "\t" in s:
        for program, option in _FAMILY_TEXT:
            if program.search(s):
                s = option.sub(lambda m: m.group(1) + REDACTED, s)
        s = _SPACED_FLAG.sub(_flag_sub, s)
    return s


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "surrogateescape")
    if value is None:
        return ""
    return str(value)


def redact_text(s: Any) -> str:
    """Redact secret values in one free-text string (a joined argv, a log line, an env value).

    Never raises; bytes are decoded with surrogateescape; input past :data:`MAX_TEXT_CHARS` is cut
    (and marked) before redaction. On an internal error the whole string becomes ``<redacted>``.
    """
    try:
        text = _to_str(s)
        cut = len(text) > MAX_TEXT_CHARS
        if cut:
            text = text[:MAX_TEXT_CHARS]
        out = _redact_text(text)
        return out + TRUNCATED if cut else out
    except Exception:  # noqa: BLE001 - fail closed: redaction must never raise
        return REDACTED


# -------------------------------------------------------------------------------- argv
_LOOKS_LIKE_FLAG = re.compile(r"^--?[A-Za-z][\w.\-]*(?:=.*)?$", re.S)
_FLAG_EQ = re.compile(r"^(--?[A-Za-z_][\w.\-]*)=(.*)$", re.S)
_ENV_ASSIGN = re.compile(r"^([A-Za-z_][\w.\-]*)=(.*)$", re.S)
_WS = re.compile(r"\s")


def _userpass(value: str) -> str:
    user, sep, password = value.partition(":")
    if not sep or not password:
        return value
    return user + ":" + REDACTED


def _redact_argv(argv: Sequence[Any]) -> List[str]:
    n = len(argv)
    out: List[str] = []
    family: Optional[str] = None
    pending = 0  # how the next argument is redacted: 0 not, _SEPARATE whole, _USERPASS after ':'
    for i in range(min(n, MAX_ARGS)):
        a = _to_str(argv[i])
        if len(a) > MAX_INPUT_CHARS:
            a = a[:MAX_INPUT_CHARS]
        if pending:
            how, pending = pending, 0
            if how == _USERPASS:
                a = _userpass(a)
            elif a:
                out.append(REDACTED)
                continue
        elif a[:1] == "-" and len(a) > 1 and a != "--":
            opts = _FAMILY_OPTS.get(family) if family else None
            handled = False
            if opts:
                for opt, how in opts.items():
                    if a == opt:
                        if how & (_SEPARATE | _USERPASS):
                            nxt = _to_str(argv[i + 1]) if i + 1 < n else ""
                            if nxt and not _LOOKS_LIKE_FLAG.match(nxt):
                                pending = _USERPASS if how == _USERPASS else _SEPARATE
                        handled = True
                        break
                    if len(opt) == 2 and a.startswith(opt) and how & _ATTACHED:
                        a = opt + REDACTED
                        handled = True
                        break
                    if a.startswith(opt + "=") and how == _USERPASS:
                        a = opt + "=" + _userpass(a[len(opt) + 1:])
                        handled = True
                        break
                    if how == _USERPASS and len(opt) == 2 and a.startswith(opt) and len(a) > 2:
                        a = opt + _userpass(a[2:])
                        handled = True
                        break
            if not handled:
                m = _FLAG_EQ.match(a)
                if m:
                    name, value = m.group(1), m.group(2)
                    cls = secret_class(name)
                    if cls and not _keeps_value(cls, value):
                        a = name + "=" + REDACTED
                else:
                    cls = secret_class(a)
                    if cls and i + 1 < n:
                        nxt = _to_str(argv[i + 1])
                        if not _LOOKS_LIKE_FLAG.match(nxt) and not _keeps_value(cls, nxt):
                            pending = _SEPARATE
        else:
            fam = _family(a)
            if fam:
                family = fam
            elif "=" in a:
                m = _ENV_ASSIGN.match(a)
                # NAME=value as one argument (env, key=value styles); with whitespace in it the
                # argument is a shell string ("PGPASSWORD=x psql ..."), left to the text rules.
                if m and not _WS.search(m.group(2)):
                    cls = secret_class(m.group(1))
                    if cls and not _keeps_value(cls, m.group(2)):
                        a = m.group(1) + "=" + REDACTED
        a = _redact_text(a)
        if len(a) > MAX_ARG_CHARS:
            a = a[:MAX_ARG_CHARS] + TRUNCATED
        out.append(a)
    if n > MAX_ARGS:
        out.append("<%d more arguments>" % (n - MAX_ARGS))
    return out


def redact_argv(argv: Any) -> List[str]:
    """Return a copy of a command line with secrets replaced by ``<redacted>`` (flag names kept).

    Accepts a list/tuple of str or bytes (bytes decoded with surrogateescape); a single string is
    taken as one argument; None as empty. Never raises: on an internal error every argument is
    redacted.
    """
    try:
        if argv is None:
            return []
        if isinstance(argv, (str, bytes, bytearray)):
            argv = [argv]
        elif not isinstance(argv, (list, tuple)):
            argv = list(argv)
        return _redact_argv(argv)
    except Exception:  # noqa: BLE001 - fail closed
        return [REDACTED]


def env_allowed(name: str) -> bool:
    """Whether an environment variable's value may be kept."""
    return name in ENV_ALLOWLIST or name.startswith(_ENV_ALLOW_PREFIXES)


def redact_env(env: Any) -> Tuple[List[str], Dict[str, str]]:
    """Split an environment into (all names, sorted) and (allow-listed name -> redact_text(value)).

    Accepts a mapping of str or bytes; never raises (on an internal error: no names, no values).
    """
    try:
        if not env:
            return [], {}
        names = set()
        allowed: Dict[str, str] = {}
        for key, value in env.items():
            name = _to_str(key)
            if not name:
                continue
            names.add(name)
            if env_allowed(name):
                allowed[name] = redact_text(value)
        return sorted(names), allowed
    except Exception:  # noqa: BLE001 - fail closed
        return [], {}


def split_environ(data: Any) -> Dict[str, str]:
    """Parse ``/proc/PID/environ`` content (NUL-separated ``NAME=value``) into a dict; pure, never raises."""
    try:
        text = _to_str(data)
        env: Dict[str, str] = {}
        for item in text.split("\0"):
            if not item:
                continue
            name, sep, value = item.partition("=")
            if sep and name:
                env[name] = value
        return env
    except Exception:  # noqa: BLE001
        return {}


__all__ = ["REDACTED", "ENV_ALLOWLIST", "redact_argv", "redact_text", "redact_env", "env_allowed",
           "secret_class", "split_environ", "MAX_ARGS", "MAX_ARG_CHARS"]
