//! `zavod chat`: one answer with --prompt, or an interactive session with
//! line editing and history, the conversation kept across turns.

use crate::cli::{Attach, ChatArgs};
use anyhow::{Context, Result, bail};
use rustyline::error::ReadlineError;
use std::io::Write;
use zavod_node::client::{self, Ask, ChatClient, ChatEvent, ChatOutcome};
use zavod_node::config::default_data_dir;
use zavod_node::datadir::{ClientIdentity, random_u128};
use zavod_proto::ids::ConversationId;
use zavod_proto::wire::GenParams;

fn new_conversation() -> Result<ConversationId> {
    let id = format!("c-{:012x}", random_u128()? & 0xffff_ffff_ffff);
    Ok(ConversationId::parse(&id)?)
}

/// A chat task on the runtime's worker (see [`client::on_worker`]).
fn on_worker<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    client::on_worker(rt, fut).context("the chat task stopped abnormally")?
}

pub fn run(args: ChatArgs) -> Result<()> {
    let params = GenParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: args.max_tokens,
        ignore_eos: false,
        raw: false,
        stop: args.stop.clone(),
        grammar: None,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        logit_bias: Vec::new(),
        resume_tokens: Vec::new(),
    };
    if let Err(m) = params.check() {
        // Out-of-range flag values are command-line misuse.
        eprintln!("error: {m}");
        std::process::exit(2);
    }
    let conversation = match &args.conversation {
        Some(c) => Some(ConversationId::parse(c).context("--conversation")?),
        None => None,
    };
    let (rt, client, dir) = connect(&args.at)?;

    if let Some(prompt) = &args.prompt {
        let ask = Ask {
            message: prompt.clone(),
            model: args.model.clone(),
            conversation,
            params,
            show_prompt: args.show_prompt,
            turn: None,
        };
        let outcome = on_worker(&rt, turn(client, ask, args.show_prompt, args.verbose))?;
        let mut out = std::io::stdout().lock();
        writeln!(out)?;
        out.flush()?;
        if args.verbose {
            report(&outcome);
        }
        warn_unrecorded(&outcome);
        return Ok(());
    }
    interactive(&rt, &client, &args, params, conversation, &dir)
}

/// A client attached to `at`'s node, on a one-thread runtime (a client
/// needs no more, and on a machine that also runs a node it takes the
/// least from inference), and the data directory it speaks for.
pub(crate) fn connect(
    at: &Attach,
) -> Result<(tokio::runtime::Runtime, ChatClient, std::path::PathBuf)> {
    let dir = at.data_dir.clone().unwrap_or_else(default_data_dir);
    let identity = ClientIdentity::load(&dir, at.credential.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let client = rt
        .block_on(ChatClient::connect_any(
            identity,
            at.peer.clone(),
            zavod_net::NetConfig::client(at.psk_file.as_deref())?,
        ))
        .with_context(|| format!("connecting to {}", at.peers()))?;
    Ok((rt, client, dir))
}

/// Streams one answer to stdout as it arrives.
async fn turn(
    client: ChatClient,
    ask: Ask,
    show_prompt: bool,
    verbose: bool,
) -> Result<ChatOutcome> {
    let mut write_err: Option<std::io::Error> = None;
    let cancel = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let outcome = client
        .chat(
            ask,
            |ev| match ev {
                ChatEvent::Accepted(a) => {
                    if verbose {
                        let peer = zavod_net::peer_label(&a.served_by);
                        eprintln!(
                            "[served by {peer}, model {}, {} earlier turns in context]",
                            a.model, a.history_turns
                        );
                    }
                    if verbose && !a.recalled.is_empty() {
                        eprintln!(
                            "[{} facts from memory in the prompt; /memory shows them]",
                            a.recalled.len()
                        );
                    }
                    if show_prompt && let Some(p) = &a.prompt {
                        eprintln!("--- prompt ---\n{p}\n--- end of prompt ---");
                    }
                }
                ChatEvent::Direct { target } => {
                    if verbose {
                        eprintln!("[streaming directly from {target}]");
                    }
                }
                ChatEvent::Relayed { reason } => {
                    if verbose {
                        eprintln!("[target out of reach ({reason}); the entry node relays]");
                    }
                }
                ChatEvent::Full { reason } => {
                    if verbose {
                        eprintln!("[the target was full ({reason}); placing on another node]");
                    }
                }
                ChatEvent::Resuming { reason, tokens } => {
                    eprintln!(
                        "[the serving node failed after {tokens} tokens ({reason}); resuming on another node]"
                    );
                }
                ChatEvent::Reattached {
                    from,
                    to,
                    reason,
                    tokens,
                } => {
                    eprintln!(
                        "[the node this chat went through, {from}, failed after {tokens} tokens ({reason}); going on through {to}]"
                    );
                }
                ChatEvent::Token { text, .. } => {
                    if write_err.is_none() {
                        let mut out = std::io::stdout().lock();
                        if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                            write_err = Some(e);
                        }
                    }
                }
            },
            cancel,
        )
        .await?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    Ok(outcome)
}

/// An answer whose turn the entry could not save is still shown; the
/// person is told the conversation lost it.
fn warn_unrecorded(o: &ChatOutcome) {
    if let Some(m) = &o.done.unrecorded {
        eprintln!("warning: {m}");
    }
}

fn report(o: &ChatOutcome) {
    let peer = zavod_net::peer_label(&o.accepted.served_by);
    eprintln!(
        "[served by {peer}: {} prompt tokens ({} from cache), {} generated ({:?}); first token after {:.0} ms, {:.1} tok/s]",
        o.done.prompt_tokens,
        o.done.cached_tokens,
        o.tokens,
        o.done.stop,
        o.first_token.as_secs_f64() * 1e3,
        o.decode_tokens_per_s()
    );
}

fn interactive(
    rt: &tokio::runtime::Runtime,
    client: &ChatClient,
    args: &ChatArgs,
    params: GenParams,
    conversation: Option<ConversationId>,
    dir: &std::path::Path,
) -> Result<()> {
    let mut editor = rustyline::DefaultEditor::new().context("starting the line editor")?;
    let history = dir.join("chat_history.txt");
    let _ = editor.load_history(&history);
    let mut conversation = match conversation {
        Some(c) => c,
        None => new_conversation()?,
    };
    // What long-term memory put in the last turn's prompt.
    let mut recalled: Vec<String> = Vec::new();
    // Other members to fall back on if this node fails.
    let learned = on_worker(rt, {
        let client = client.clone();
        async move { Ok(client.learn_peers().await) }
    })?;
    if args.verbose {
        eprintln!("[{learned} more node addresses learned from the mesh]");
    }
    eprintln!(
        "connected to {} — conversation {conversation}. /new starts over, /memory shows what was recalled, /quit leaves; Ctrl-C stops an answer.",
        client.peer()
    );
    loop {
        let line = match editor.readline("you> ") {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => bail!("reading input: {e}"),
        };
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(text);
        match text {
            "/quit" | "/exit" => break,
            "/new" => {
                conversation = new_conversation()?;
                eprintln!("(new conversation {conversation})");
                continue;
            }
            "/help" => {
                eprintln!(
                    "/new — start a new conversation; /memory — what the last prompt recalled from \
                     long-term memory; /quit — leave; anything else is sent to the model"
                );
                continue;
            }
            "/memory" => {
                if recalled.is_empty() {
                    eprintln!("(the last prompt recalled nothing from long-term memory)");
                } else {
                    eprintln!("the last prompt recalled:");
                    for f in &recalled {
                        eprintln!("  - {f}");
                    }
                }
                continue;
            }
            _ => {}
        }
        let ask = Ask {
            message: text.to_string(),
            model: args.model.clone(),
            conversation: Some(conversation.clone()),
            params: params.clone(),
            show_prompt: args.show_prompt,
            turn: None,
        };
        match on_worker(
            rt,
            turn(client.clone(), ask, args.show_prompt, args.verbose),
        ) {
            Ok(outcome) => {
                recalled = outcome.accepted.recalled.clone();
                println!();
                if args.verbose {
                    report(&outcome);
                }
                warn_unrecorded(&outcome);
            }
            Err(e) => eprintln!("\nerror: {e:#}"),
        }
    }
    let _ = editor.save_history(&history);
    Ok(())
}
