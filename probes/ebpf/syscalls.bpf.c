// Syscall counts of the traced tree: sys_enter, per (tgid, syscall nr).
//
// Attached as a raw tracepoint (BPF_PROG_TYPE_RAW_TRACEPOINT, 4.17+: ctx->args[1] is the syscall
// id, no perf record is prepared) where the kernel has one, else as the perf-event tracepoint
// raw_syscalls:sys_enter (args->id). Only the tracepoint's arguments and helper results are read.
//
// Order of checks, cheapest first:
//   1. syscall_hot[nr] (an array: the verifier inlines the lookup, no helper call). Userspace marks
//      a syscall hot once it has been counted above a rate; a call of a hot syscall goes on only
//      one time in SC_SAMPLE_MASK + 1 (bpf_get_prandom_u32), and is counted under nr | SC_SAMPLED
//      so that userspace scales exactly those counts. Only with SC_HOT.
//   2. traced[tgid] (a hash owned by proc.bpf.c): is the caller traced?
//   3. one per-CPU counter increment (no atomics).
// Userspace reads the cumulative counters on drain and reports the difference. Needs proc.bpf.c first.

#define SC_NR_MAX {{SYSCALL_NR_MAX}}
#define SC_HOT {{SYSCALL_HOT}}
#define SC_SAMPLE_MASK {{SYSCALL_SAMPLE_MASK}}
#define SC_RAW_TP {{SYSCALL_RAW_TP}}
#define SC_SAMPLED 0x80000000U

struct sc_key {
    u32 tgid;
    u32 nr;  // | SC_SAMPLED: calls counted one in SC_SAMPLE_MASK + 1
};

BPF_PERCPU_HASH(syscall_counts, struct sc_key, u64, {{SYSCALL_KEYS_MAX}});
#if SC_HOT
BPF_ARRAY(syscall_hot, u32, SC_NR_MAX);  // [nr] != 0: nr is hot, sample it
#endif

static __always_inline int count_syscall(u32 nr)
{
    u32 sampled = 0;
#if SC_HOT
    u32 *hot = syscall_hot.lookup(&nr);
    if (hot && *hot) {
        if (bpf_get_prandom_u32() & SC_SAMPLE_MASK)
            return 0;
        sampled = SC_SAMPLED;
    }
#endif
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!traced.lookup(&tgid))
        return 0;
    struct sc_key key = {};
    key.tgid = tgid;
    key.nr = nr | sampled;
    u64 zero = 0;
    u64 *count = syscall_counts.lookup_or_try_init(&key, &zero);
    if (count)
        (*count)++;
    return 0;
}

#if SC_RAW_TP
RAW_TRACEPOINT_PROBE(sys_enter)
{
    // TP_PROTO(struct pt_regs *regs, long id)
    return count_syscall((u32)ctx->args[1]);
}
#else
TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
    return count_syscall((u32)args->id);
}
#endif
