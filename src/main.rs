use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use etp::config::Config;

#[derive(Parser)]
#[command(
    name = "etp",
    version,
    about = "Node-level TPROXY traffic router for the Linkerd service mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the desired nftables table (nft syntax) and policy routing.
    Render {
        /// Config file; the embedded default when omitted.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Render { config }) => {
            let cfg = match config {
                Some(p) => match Config::load(&p) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("etp: {e}");
                        return ExitCode::from(2);
                    }
                },
                None => Config::embedded(),
            };
            print!("{}", etp::plan::plan(&cfg));
            ExitCode::SUCCESS
        }
        None => ExitCode::from(2),
    }
}
