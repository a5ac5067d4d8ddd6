// Syscall counts of the traced tree: raw_syscalls:sys_enter, per (tgid, syscall nr).
//
// The fast path for every syscall on the host is one hash lookup (is the caller traced?);
// for a traced caller, one per-CPU counter increment (no atomics). Userspace reads the
// cumulative counters on drain and reports the difference. Needs proc.bpf.c first.

struct sc_key {
    u32 tgid;
    u32 nr;
};

BPF_PERCPU_HASH(syscall_counts, struct sc_key, u64, {{SYSCALL_KEYS_MAX}});

TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!traced.lookup(&tgid))
        return 0;
    struct sc_key key = {};
    key.tgid = tgid;
    key.nr = (u32)args->id;
    u64 zero = 0;
    u64 *count = syscall_counts.lookup_or_try_init(&key, &zero);
    if (count)
        (*count)++;
    return 0;
}
