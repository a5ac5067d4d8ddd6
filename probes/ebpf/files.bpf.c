// File opens of the traced tree, deduplicated in the kernel.
//
// syscalls:sys_enter_{openat,openat2,open,creat} keep (dirfd, flags, user path pointer) per
// thread; the matching sys_exit reads the path from user memory and emits an event only the
// first time a (tgid, path hash, access class, errno) key is seen; later opens only bump the
// key's counter, read at drain time. chdir/fchdir are emitted so userspace can resolve
// relative paths; each one bumps a per-process "cwd generation" mixed into relative paths'
// hashes, so one relative name under two working directories stays two facts.
// Needs proc.bpf.c first (the `traced` map).

#define PATH_LEN {{PATH_LEN}}
#define HAVE_OPEN_TP {{HAVE_OPEN_TP}}
#define HAVE_CREAT_TP {{HAVE_CREAT_TP}}
#define HAVE_OPENAT2_TP {{HAVE_OPENAT2_TP}}
#define AB_AT_FDCWD -100
#define AB_OPEN_CLASS_MASK {{OPEN_CLASS_MASK}}

enum file_kind { FILE_OPEN = 1, FILE_CHDIR = 2, FILE_FCHDIR = 3 };
enum file_call { CALL_OPEN = 0, CALL_CHDIR = 1, CALL_FCHDIR = 2 };

struct open_args {
    u64 fname;
    s32 dfd;
    s32 flags;
    u32 call;
    u32 pad;
};

struct file_key {
    u32 tgid;
    u32 cls;
    u64 hash;
    s32 err;
    u32 pad;
};

struct file_val {
    u64 count;
    u64 last_ns;
};

struct file_event {
    u64 ts;
    u32 kind;
    u32 pid;
    u32 tid;
    s32 dfd;
    s32 flags;
    s32 err;
    u64 hash;
    u32 cls;
    s32 len;
    char path[PATH_LEN];
};

BPF_HASH(open_inflight, u64, struct open_args, 10240);
BPF_TABLE("lru_hash", struct file_key, struct file_val, file_seen, {{FILE_SEEN_MAX}});
BPF_HASH(cwd_gen, u32, u32, {{MAX_PROCS}});
BPF_PERCPU_ARRAY(file_scratch, struct file_event, 1);
BPF_PERF_OUTPUT(file_events);

static __always_inline int path_enter(const char *fname, int dfd, int flags, u32 call)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!traced.lookup(&tgid))
        return 0;
    struct open_args a = {};
    a.fname = (u64)fname;
    a.dfd = dfd;
    a.flags = flags;
    a.call = call;
    open_inflight.update(&id, &a);
    return 0;
}

static __always_inline int path_exit(void *ctx, long ret)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    struct open_args *a = open_inflight.lookup(&id);
    if (!a)
        return 0;
    struct open_args in = *a;
    open_inflight.delete(&id);
    if (in.call != CALL_OPEN && ret != 0)
        return 0;  // a failed chdir changes nothing
    u32 zero = 0;
    struct file_event *ev = file_scratch.lookup(&zero);
    if (!ev)
        return 0;
    u64 now = bpf_ktime_get_ns();
    ev->ts = now;
    ev->pid = tgid;
    ev->tid = (u32)id;
    ev->dfd = in.dfd;
    ev->flags = in.flags;
    ev->err = ret < 0 ? (s32)-ret : 0;
    ev->cls = 0;
    ev->hash = 0;
    ev->len = 0;
    ev->path[0] = 0;
    if (in.call == CALL_FCHDIR) {
        ev->kind = FILE_FCHDIR;
    } else {
        ev->len = bpf_probe_read_user_str(ev->path, PATH_LEN, (void *)in.fname);
        ev->kind = in.call == CALL_OPEN ? FILE_OPEN : FILE_CHDIR;
    }
    if (in.call != CALL_OPEN) {
        u32 one = 1;
        u32 *gen = cwd_gen.lookup(&tgid);
        if (gen)
            __sync_fetch_and_add(gen, 1);
        else
            cwd_gen.update(&tgid, &one);
        file_events.perf_submit(ctx, ev, sizeof(*ev));
        return 0;
    }
    if (ev->len <= 0)
        return 0;  // path not readable from user memory: nothing to name
    // FNV-1a over the path; relative paths also mix in the dirfd and cwd generation.
    u64 h = 14695981039346656037ULL;
    int n = ev->len - 1;  // without the NUL
#pragma clang loop unroll(disable)
    for (int i = 0; i < PATH_LEN; i++) {
        if (i >= n)
            break;
        h ^= (u8)ev->path[i & (PATH_LEN - 1)];  // PATH_LEN is a power of two
        h *= 1099511628211ULL;
    }
    if (ev->path[0] != '/') {
        u32 *gen = cwd_gen.lookup(&tgid);
        h ^= ((u64)(u32)in.dfd << 32) | (gen ? *gen : 0);
        h *= 1099511628211ULL;
    }
    ev->hash = h;
    ev->cls = (u32)in.flags & AB_OPEN_CLASS_MASK;
    struct file_key key = {};
    key.tgid = tgid;
    key.cls = ev->cls;
    key.hash = h;
    key.err = ev->err;
    struct file_val *val = file_seen.lookup(&key);
    if (val) {
        __sync_fetch_and_add(&val->count, 1);
        val->last_ns = now;
        return 0;
    }
    struct file_val nv = {};
    nv.count = 1;
    nv.last_ns = now;
    file_seen.update(&key, &nv);
    file_events.perf_submit(ctx, ev, sizeof(*ev));
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat) { return path_enter(args->filename, args->dfd, args->flags, CALL_OPEN); }
TRACEPOINT_PROBE(syscalls, sys_exit_openat) { return path_exit(args, args->ret); }
#if HAVE_OPENAT2_TP
TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
    u64 flags = 0;  // struct open_how starts with __u64 flags (UAPI)
    bpf_probe_read_user(&flags, sizeof(flags), (void *)args->how);
    return path_enter(args->filename, args->dfd, (int)flags, CALL_OPEN);
}
TRACEPOINT_PROBE(syscalls, sys_exit_openat2) { return path_exit(args, args->ret); }
#endif
#if HAVE_OPEN_TP
TRACEPOINT_PROBE(syscalls, sys_enter_open) { return path_enter(args->filename, AB_AT_FDCWD, args->flags, CALL_OPEN); }
TRACEPOINT_PROBE(syscalls, sys_exit_open) { return path_exit(args, args->ret); }
#endif
#if HAVE_CREAT_TP
TRACEPOINT_PROBE(syscalls, sys_enter_creat) { return path_enter(args->pathname, AB_AT_FDCWD, {{CREAT_FLAGS}}, CALL_OPEN); }
TRACEPOINT_PROBE(syscalls, sys_exit_creat) { return path_exit(args, args->ret); }
#endif
TRACEPOINT_PROBE(syscalls, sys_enter_chdir) { return path_enter(args->filename, AB_AT_FDCWD, 0, CALL_CHDIR); }
TRACEPOINT_PROBE(syscalls, sys_exit_chdir) { return path_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_fchdir) { return path_enter(0, (int)args->fd, 0, CALL_FCHDIR); }
TRACEPOINT_PROBE(syscalls, sys_exit_fchdir) { return path_exit(args, args->ret); }
