//! `lks-pack <guest.elf> <out-dir> [name]`: writes `<out-dir>/<name>.elf` and `<out-dir>/<name>.bzimage`
//! (name defaults to the input's file stem) and prints both paths.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 3 {
        eprintln!("usage: lks-pack <guest.elf> <out-dir> [name]");
        return ExitCode::from(2);
    }
    let input = PathBuf::from(&args[0]);
    let name = match args.get(2) {
        Some(name) => name.clone(),
        None => input
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "guest".into()),
    };
    match lks_pack::pack_file(&input, &PathBuf::from(&args[1]), &name) {
        Ok((elf, bzimage)) => {
            println!("{}", elf.display());
            println!("{}", bzimage.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("lks-pack: {error}");
            ExitCode::FAILURE
        }
    }
}
