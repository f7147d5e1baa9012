//! `llmctl up`: the whole serving plane on one machine. Starts the pool controller (executors
//! are `llmctl worker` child processes) and the gateway following it, in this process; prints
//! where to send requests; on Ctrl-C drains the gateway, then the executors, and exits with no
//! child left behind.
//!
//! With no `--config`, the default plane: a `tiny` random model (written with `model init` if
//! its folder is missing), one pool `default` serving it with one warm executor and room for
//! three ephemeral ones, and an open gateway (no API keys: local use only). A config file
//! replaces the defaults: its `[controller]` table is a controller spec file and its
//! `[gateway]` table a gateway config file (see docs/up.md); the gateway's pools default to
//! the controller's and its controller link to this process's controller.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use llmctl_gateway::config::Config as GatewayConfig;
use llmctl_inference_worker::model::init::{InitDtype, InitOptions, Preset};
use llmctl_pool_controller::controller;
use llmctl_pool_controller::spec::ControllerConfig;

#[derive(Args)]
pub struct UpArgs {
    /// A TOML file with `[controller]` and `[gateway]` tables (see docs/up.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The gateway's address (default plane only).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Model folder of the default pool, written with `model init` if missing.
    #[arg(long, default_value = "models/tiny")]
    model: PathBuf,
    /// The model name clients send (default plane only).
    #[arg(long, default_value = "tiny")]
    served_model_name: String,
    /// Where executor logs go (default plane only).
    #[arg(long, default_value = ".llmctl/logs")]
    log_dir: PathBuf,
}

/// A TOML string literal.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn default_controller(args: &UpArgs) -> String {
    format!(
        r#"listen = "127.0.0.1:0"
log_dir = {log_dir}

[[pools]]
name = "default"
models = [{model}]

[pools.executor]
model = {folder}
args = ["--kv-cache-mib", "256"]
max_concurrency = 32

[pools.scaling]
min_warm = 1
max_replicas = 4
target_concurrency = 8
stable_window_secs = 30
panic_window_secs = 3
idle_ttl_secs = 60
"#,
        log_dir = quoted(&args.log_dir.display().to_string()),
        model = quoted(&args.served_model_name),
        folder = quoted(&args.model.display().to_string()),
    )
}

/// The two tables of an `up` file, or the defaults.
fn tables(args: &UpArgs) -> Result<(String, toml::Table, toml::Table)> {
    let Some(path) = &args.config else {
        let controller: toml::Table = toml::from_str(&default_controller(args))?;
        let gateway: toml::Table =
            toml::from_str(&format!("listen = {}\nopen = true\n", quoted(&args.listen)))?;
        return Ok(("(defaults)".into(), controller, gateway));
    };
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {origin}"))?;
    let mut file: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {origin}"))?;
    let mut take = |key: &str| match file.remove(key) {
        Some(toml::Value::Table(t)) => Ok(t),
        Some(_) => bail!("{origin}: `{key}` must be a table"),
        None => bail!("{origin}: a `[{key}]` table is needed"),
    };
    let (controller, gateway) = (take("controller")?, take("gateway")?);
    if let Some(key) = file.keys().next() {
        bail!("{origin}: unknown key `{key}` (expected only [controller] and [gateway])");
    }
    Ok((origin, controller, gateway))
}

fn ensure_model(folder: &Path) -> Result<()> {
    if folder.join("config.json").exists() {
        return Ok(());
    }
    eprintln!("writing the default tiny model to {} ...", folder.display());
    llmctl_inference_worker::model::init::write_model(
        folder,
        &InitOptions {
            preset: Preset::Tiny,
            seed: 0,
            dtype: InitDtype::Bf16,
        },
    )
    .with_context(|| format!("writing the default model to {}", folder.display()))
}

pub fn run(args: UpArgs) -> Result<()> {
    let (origin, controller_table, mut gateway_table) = tables(&args)?;
    let controller_config = ControllerConfig::parse(
        &toml::to_string(&controller_table)?,
        &format!("{origin} [controller]"),
    )?;
    if args.config.is_none() {
        ensure_model(&controller_config.pools[0].executor.model)?;
    }
    for pool in &controller_config.pools {
        let folder = &pool.executor.model;
        if !folder.join("config.json").exists() {
            bail!(
                "{origin} [controller]: pool {:?}: no model in {} (create one with `llmctl model init --out {}`)",
                pool.name,
                folder.display(),
                folder.display()
            );
        }
    }
    let program = std::env::current_exe().context("finding the llmctl binary")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let running = controller::start(controller_config.clone(), program).await?;
        let controller_url = format!("http://{}", running.addr);
        if !gateway_table.contains_key("pools") {
            let pools = controller_config
                .pools
                .iter()
                .map(|p| {
                    toml::Value::Table(toml::Table::from_iter([
                        ("name".to_owned(), toml::Value::String(p.name.clone())),
                        (
                            "models".to_owned(),
                            toml::Value::Array(
                                p.models.iter().cloned().map(toml::Value::String).collect(),
                            ),
                        ),
                    ]))
                })
                .collect();
            gateway_table.insert("pools".into(), toml::Value::Array(pools));
        }
        if !gateway_table.contains_key("controller") {
            gateway_table.insert(
                "controller".into(),
                toml::Value::Table(toml::Table::from_iter([(
                    "url".to_owned(),
                    toml::Value::String(controller_url.clone()),
                )])),
            );
        }
        let gateway_config = match GatewayConfig::parse(
            &toml::to_string(&gateway_table)?,
            &format!("{origin} [gateway]"),
        ) {
            Ok(c) => c,
            Err(e) => {
                running.shutdown().await;
                return Err(e.into());
            }
        };
        let listening = match llmctl_gateway::server::listen(&gateway_config).await {
            Ok(l) => l,
            Err(e) => {
                running.shutdown().await;
                return Err(e.context("starting the gateway (is another `llmctl up` running? try --listen 127.0.0.1:0)"));
            }
        };
        let scheme = if listening.tls() { "https" } else { "http" };
        let gateway_url = format!("{scheme}://{}", listening.addr);
        {
            use std::io::Write;
            let event = serde_json::json!({"event": "up", "gateway": gateway_url, "controller": controller_url});
            let text = format!("{event}\n{}", banner(&gateway_url, &controller_url, &controller_config, &gateway_config));
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
        }
        llmctl_gateway::server::run(listening, gateway_config).await?;
        eprintln!("gateway drained; stopping executors ...");
        running.shutdown().await;
        eprintln!("stopped.");
        Ok(())
    })
}

/// What to tell the user; written with errors ignored (a closed stdout must not stop the plane).
fn banner(gateway: &str, controller: &str, c: &ControllerConfig, g: &GatewayConfig) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let model = &c.pools[0].models[0];
    let key = if g.open { "unused" } else { "YOUR_KEY" };
    let auth = if g.open {
        String::new()
    } else {
        " -H 'Authorization: Bearer YOUR_KEY'".to_owned()
    };
    let _ = writeln!(out);
    let _ = writeln!(out, "llmctl is up.");
    let _ = writeln!(
        out,
        "  gateway     {gateway}/v1{}",
        if g.open {
            "   (open mode: no API key needed; local use only)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "  controller  {controller}/v1/pools   metrics: {controller}/metrics"
    );
    for p in &c.pools {
        let _ = writeln!(
            out,
            "  pool {:<10} models {:?}, {} warm, up to {} executors, logs in {}",
            p.name,
            p.models,
            p.scaling.min_warm,
            p.scaling.max_replicas,
            c.log_dir.join(&p.name).display()
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Try it:");
    let _ = writeln!(
        out,
        "  curl {gateway}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n    \
         -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], \"max_tokens\": 32}}'"
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "  # Python, with the OpenAI SDK (pip install openai)");
    let _ = writeln!(out, "  from openai import OpenAI");
    let _ = writeln!(
        out,
        "  client = OpenAI(base_url=\"{gateway}/v1\", api_key=\"{key}\")"
    );
    let _ = writeln!(
        out,
        "  reply = client.chat.completions.create(model=\"{model}\", messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}], max_tokens=32)"
    );
    let _ = writeln!(out, "  print(reply.choices[0].message.content)");
    let _ = writeln!(out);
    let _ = writeln!(out, "Ctrl-C drains and stops everything.");
    out
}
