//! `pio download`: a checkpoint from the Hugging Face hub into its shared cache, only the files
//! pio-export reads. The snapshot folder is the last line on stdout.

use anyhow::Result;
use pio_models::presets::find_preset;

#[derive(clap::Args)]
#[command(after_help = "Environment: HF_HOME (the cache root, default ~/.cache/huggingface), HF_TOKEN (else the \
token file under HF_HOME), HF_ENDPOINT (a mirror), HF_HUB_OFFLINE=1 (the cache only).")]
pub struct DownloadArgs {
    /// A preset (see `pio models`) or a Hugging Face repository id (owner/name).
    model: String,
    /// The branch, tag or commit to download.
    #[arg(long, default_value = "main")]
    revision: String,
}

pub fn run(args: DownloadArgs) -> Result<()> {
    let (repo, preset) = if args.model.contains('/') {
        (args.model.as_str(), None)
    } else {
        let preset = find_preset(&args.model)?;
        (preset.hf_repo, Some(preset.name))
    };
    let hub = pio_hub::HubBuilder::from_env()?.progress(true).build()?;
    let snapshot = hub.download(repo, &args.revision)?;
    // `--model` exports the preset's main branch: another revision is exported from its folder.
    let export = match preset {
        Some(name) if args.revision == "main" => format!("pio-export --model {name}"),
        _ => format!("pio-export --checkpoint {}", snapshot.dir.display()),
    };
    tracing::info!("{repo} at commit {} is in the cache; export it with `{export}`", snapshot.commit);
    println!("{}", snapshot.dir.display());
    Ok(())
}
