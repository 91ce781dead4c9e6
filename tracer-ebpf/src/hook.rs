//! One body, two program types: every tracepoint hook is built both as a BTF-typed
//! tracepoint (`tp_btf`, preferred) and as a raw tracepoint (`raw_tp`), which loads where
//! the first does not (or is skipped with `--skip-hook-kind tp_btf`). Both contexts read
//! the tracepoint's arguments with `arg(n)`, so the body is written once.

/// `tracepoint_hook! { fn NAME / RAW_NAME (ctx) { body } }`: programs `NAME` (tp_btf)
/// and `RAW_NAME` (raw_tp). Userspace gives the tracepoint's name when it attaches them.
///
/// The body sees `BTF`: whether its pointer arguments are typed (tp_btf), so that the
/// fields of the structures they point to may be loaded in place (`kernel::load`) rather
/// than through a helper call; a raw tracepoint's are plain numbers.
macro_rules! tracepoint_hook {
    ($(#[$doc:meta])* fn $tp:ident / $raw:ident ($ctx:ident) $body:block) => {
        $(#[$doc])*
        #[aya_ebpf::macros::btf_tracepoint]
        pub fn $tp($ctx: aya_ebpf::programs::BtfTracePointContext) -> i32 {
            #[allow(dead_code)]
            const BTF: bool = true;
            $body
        }

        $(#[$doc])*
        #[aya_ebpf::macros::raw_tracepoint]
        pub fn $raw($ctx: aya_ebpf::programs::RawTracePointContext) -> i32 {
            #[allow(dead_code)]
            const BTF: bool = false;
            $body
        }
    };
}
