// Process lifecycle of the traced tree: the `traced` set, fork/exec/exit, argv at execve.
//
// Every asbuilt BPF object starts with this file: it owns the `traced` map (tgid -> parent
// tgid) that every other program checks first, and keeps it current from the sched
// tracepoints. Only tracepoint arguments, helper results and user memory are read (never a
// kernel struct field): the running kernel's headers are not the ones installed.
#include <uapi/linux/ptrace.h>

#define FOLLOW_CHILDREN {{FOLLOW_CHILDREN}}
#define PROC_EVENTS {{PROC_EVENTS}}
#define HAVE_FORK_TP {{HAVE_FORK_TP}}
#define HAVE_CLONE3_TP {{HAVE_CLONE3_TP}}
#define HAVE_EXECVEAT_TP {{HAVE_EXECVEAT_TP}}
#define ARGV_MAX {{ARGV_MAX}}
#define ARG_LEN {{ARG_LEN}}
#define AB_CLONE_THREAD 0x00010000ULL

enum proc_kind { PROC_FORK = 1, PROC_EXEC = 2, PROC_EXIT = 3, PROC_ARGV = 4 };
// flags
#define PF_HAS_CODE 1      // exit: code from exit_group
#define PF_THREAD_UNKNOWN 2  // fork: no clone syscall seen (kernel-made task)
#define PF_ARGV_TRUNC 4    // argv: more arguments than ARGV_MAX

struct proc_event {
    u64 ts;
    u32 kind;
    u32 pid;   // tgid
    u32 ppid;  // parent tgid (fork, exec), 0 when unknown
    u32 tid;   // fork: child pid; exec: old_pid; argv: calling thread
    s32 code;
    u32 flags;
    u32 argc;
    u32 pad;
    char comm[16];
    char data[ARGV_MAX * ARG_LEN];
};

BPF_HASH(traced, u32, u32, {{MAX_PROCS}});
BPF_HASH(clone_flags, u64, u64, 4096);
BPF_HASH(exit_codes, u32, s32, {{MAX_PROCS}});
BPF_PERCPU_ARRAY(proc_scratch, struct proc_event, 1);
BPF_PERF_OUTPUT(proc_events);

static __always_inline u32 *traced_parent(u32 tgid)
{
    return traced.lookup(&tgid);
}

static __always_inline int clone_enter(u64 flags)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!traced.lookup(&tgid))
        return 0;
    clone_flags.update(&id, &flags);
    return 0;
}

static __always_inline int clone_exit(void)
{
    u64 id = bpf_get_current_pid_tgid();
    clone_flags.delete(&id);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_clone) { return clone_enter(args->clone_flags); }
TRACEPOINT_PROBE(syscalls, sys_exit_clone) { return clone_exit(); }
#if HAVE_CLONE3_TP
TRACEPOINT_PROBE(syscalls, sys_enter_clone3)
{
    u64 flags = 0;  // struct clone_args starts with __aligned_u64 flags (UAPI)
    bpf_probe_read_user(&flags, sizeof(flags), (void *)args->uargs);
    return clone_enter(flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_clone3) { return clone_exit(); }
#endif
#if HAVE_FORK_TP
TRACEPOINT_PROBE(syscalls, sys_enter_fork) { return clone_enter(0); }
TRACEPOINT_PROBE(syscalls, sys_exit_fork) { return clone_exit(); }
TRACEPOINT_PROBE(syscalls, sys_enter_vfork) { return clone_enter(0); }
TRACEPOINT_PROBE(syscalls, sys_exit_vfork) { return clone_exit(); }
#endif

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 ptgid = id >> 32;
    if (!traced.lookup(&ptgid))
        return 0;
    u32 child = args->child_pid;
    u64 *fl = clone_flags.lookup(&id);
    if (fl && (*fl & AB_CLONE_THREAD))
        return 0;  // a new thread: covered by its tgid already
    if (!FOLLOW_CHILDREN)
        return 0;
    traced.update(&child, &ptgid);
    if (!PROC_EVENTS)
        return 0;
    u32 zero = 0;
    struct proc_event *ev = proc_scratch.lookup(&zero);
    if (!ev)
        return 0;
    ev->ts = bpf_ktime_get_ns();
    ev->kind = PROC_FORK;
    ev->pid = child;
    ev->ppid = ptgid;
    ev->tid = child;
    ev->code = 0;
    ev->flags = fl ? 0 : PF_THREAD_UNKNOWN;
    ev->argc = 0;
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
    proc_events.perf_submit(args, ev, sizeof(struct proc_event) - sizeof(ev->data));
    return 0;
}

static __always_inline int argv_enter(void *ctx, const char *const *argv)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!PROC_EVENTS || !traced.lookup(&tgid))
        return 0;
    u32 zero = 0;
    struct proc_event *ev = proc_scratch.lookup(&zero);
    if (!ev)
        return 0;
    ev->ts = bpf_ktime_get_ns();
    ev->kind = PROC_ARGV;
    ev->pid = tgid;
    ev->ppid = 0;
    ev->tid = (u32)id;
    ev->code = 0;
    ev->flags = 0;
    ev->argc = 0;
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
#pragma unroll
    for (int i = 0; i < ARGV_MAX; i++) {
        const char *arg = 0;
        if (bpf_probe_read_user(&arg, sizeof(arg), (void *)&argv[i]) || !arg)
            goto done;
        ev->data[i * ARG_LEN] = 0;
        bpf_probe_read_user_str(&ev->data[i * ARG_LEN], ARG_LEN, arg);
        ev->argc = i + 1;
    }
    {
        const char *more = 0;
        bpf_probe_read_user(&more, sizeof(more), (void *)&argv[ARGV_MAX]);
        if (more)
            ev->flags |= PF_ARGV_TRUNC;
    }
done:
    proc_events.perf_submit(ctx, ev, sizeof(struct proc_event));
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve) { return argv_enter(args, args->argv); }
#if HAVE_EXECVEAT_TP
TRACEPOINT_PROBE(syscalls, sys_enter_execveat) { return argv_enter(args, args->argv); }
#endif

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 *pp = traced.lookup(&tgid);
    if (!pp || !PROC_EVENTS)
        return 0;
    u32 zero = 0;
    struct proc_event *ev = proc_scratch.lookup(&zero);
    if (!ev)
        return 0;
    ev->ts = bpf_ktime_get_ns();
    ev->kind = PROC_EXEC;
    ev->pid = tgid;
    ev->ppid = *pp;
    ev->tid = args->old_pid;
    ev->code = 0;
    ev->flags = 0;
    ev->argc = 0;
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
    unsigned short loc = args->data_loc_filename & 0xFFFF;
    ev->data[0] = 0;
    bpf_probe_read_kernel_str(ev->data, ARG_LEN * 4, (char *)args + loc);
    proc_events.perf_submit(args, ev, sizeof(struct proc_event));
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!traced.lookup(&tgid))
        return 0;
    s32 code = args->error_code & 0xff;
    exit_codes.update(&tgid, &code);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (tid != tgid)
        traced.delete(&tid);  // a kernel-made task added at fork, if any
    u32 *pp = traced.lookup(&tgid);
    if (!pp)
        return 0;
    if (!({{GROUP_DEAD}}))
        return 0;
    u32 ppid = *pp;
    s32 *code = exit_codes.lookup(&tgid);
    if (PROC_EVENTS) {
        u32 zero = 0;
        struct proc_event *ev = proc_scratch.lookup(&zero);
        if (ev) {
            ev->ts = bpf_ktime_get_ns();
            ev->kind = PROC_EXIT;
            ev->pid = tgid;
            ev->ppid = ppid;
            ev->tid = tid;
            ev->code = code ? *code : 0;
            ev->flags = code ? PF_HAS_CODE : 0;
            ev->argc = 0;
            bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
            proc_events.perf_submit(args, ev, sizeof(struct proc_event) - sizeof(ev->data));
        }
    }
    exit_codes.delete(&tgid);
    traced.delete(&tgid);
    return 0;
}
