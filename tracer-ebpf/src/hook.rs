//! One body, two program types: every tracepoint hook is built both as a BTF-typed
//! tracepoint (`tp_btf`, preferred) and as a raw tracepoint (`raw_tp`), which loads where
//! the first does not (or is skipped with `--skip-hook-kind tp_btf`). Both contexts read
//! the tracepoint's arguments with `arg(n)`, so the body is written once.

/// `tracepoint_hook! { fn NAME / RAW_NAME (ctx) { body } }`: programs `NAME` (tp_btf)
/// and `RAW_NAME` (raw_tp). Userspace gives the tracepoint's name when it attaches them.
macro_rules! tracepoint_hook {
    ($(#[$doc:meta])* fn $tp:ident / $raw:ident ($ctx:ident) $body:block) => {
        $(#[$doc])*
        #[aya_ebpf::macros::btf_tracepoint]
        pub fn $tp($ctx: aya_ebpf::programs::BtfTracePointContext) -> i32 $body

        $(#[$doc])*
        #[aya_ebpf::macros::raw_tracepoint]
        pub fn $raw($ctx: aya_ebpf::programs::RawTracePointContext) -> i32 $body
    };
}
