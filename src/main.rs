//! The `finch` binary: parses the command line and hands over to the library.

#[global_allocator]
static GLOBAL: finch::alloc::FinchAlloc = finch::alloc::FinchAlloc;

fn main() {
    // Freed memory kept for the next step, large blocks in an arena of their own: see the module.
    finch::alloc::configure();
    // candle runs elementwise ops on its own spinning thread pool beside rayon's (used by the
    // matmuls and Finch's fused ops). On a 2-core laptop the two pools fight and a third of the
    // step is spent spinning; elementwise ops are memory-bound anyway. Measured: 121 -> 182
    // tokens/s in `finch bench train`. The user's own setting wins.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // Once, before any thread exists: candle asks for its thread count on every matmul and,
    // unless RAYON_NUM_THREADS is set, parses /proc/cpuinfo to answer.
    finch::kernels::cpu::pin_thread_count_env();
    if let Err(msg) = finch::kernels::cpu::check_env() {
        eprintln!("error: {msg}");
        std::process::exit(2);
    }
    let cli = <finch::cli::Cli as clap::Parser>::parse();
    if cli.command.is_none() {
        open_studio();
        return;
    }
    match finch::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(1);
        }
    }
}

/// No subcommand: open the studio window.
#[cfg(feature = "studio")]
fn open_studio() {
    if let Err(err) = finch::ui::run_native(finch::ui::StartOptions::from_env()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// No subcommand in a headless build: there is no window to open.
#[cfg(not(feature = "studio"))]
fn open_studio() {
    eprintln!(
        "error: this build of finch has no studio (built without the `studio` feature); \
         use the CLI subcommands (`finch --help` lists them)"
    );
    std::process::exit(2);
}
