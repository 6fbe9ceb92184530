//! `zavod memory`: a credential holder's own conversations on a node:
//! list them, export one as JSON lines, delete one or all.

use crate::cli::{Attach, MemoryCommand};
use anyhow::{Context, Result, bail};
use std::io::Write;
use zavod_node::client;
use zavod_proto::ids::ConversationId;
use zavod_proto::wire::memory::{MemoryOp, MemoryReply};

pub fn run(cmd: MemoryCommand) -> Result<()> {
    match cmd {
        MemoryCommand::List { at } => {
            let reply = ask(&at, MemoryOp::List)?;
            let MemoryReply::Conversations { names, truncated } = reply else {
                bail!("the node answered a list with something else");
            };
            let mut out = std::io::stdout().lock();
            for n in &names {
                writeln!(out, "{n}")?;
            }
            if truncated {
                eprintln!("(the node holds more than the {} listed)", names.len());
            }
            Ok(())
        }
        MemoryCommand::Export { conversation, at } => {
            let conversation = ConversationId::parse(&conversation).context("--conversation")?;
            export(&at, conversation)
        }
        MemoryCommand::Delete {
            conversation,
            all,
            at,
        } => {
            let op = match (conversation, all) {
                (Some(c), false) => MemoryOp::Delete {
                    conversation: ConversationId::parse(&c).context("--conversation")?,
                },
                (None, true) => MemoryOp::DeleteAll,
                _ => bail!("give --conversation ID or --all"),
            };
            let MemoryReply::Deleted { conversations } = ask(&at, op)? else {
                bail!("the node answered a deletion with something else");
            };
            eprintln!("deleted {conversations} conversation(s)");
            Ok(())
        }
    }
}

/// Prints every turn, page by page, as JSON lines.
fn export(at: &Attach, conversation: ConversationId) -> Result<()> {
    let (rt, client, _) = crate::chat::connect(at)?;
    let mut out = std::io::stdout().lock();
    let mut from = 0;
    loop {
        let op = MemoryOp::Export {
            conversation: conversation.clone(),
            from,
        };
        let c = client.clone();
        let reply = client::on_worker(&rt, async move { c.memory(op).await })
            .context("the memory task stopped abnormally")??;
        let MemoryReply::Turns { turns, next, held } = reply else {
            bail!("the node answered an export with something else");
        };
        if !held {
            bail!("the mesh holds no conversation {conversation} of yours");
        }
        for t in turns {
            let line = serde_json::json!({
                "role": t.role.as_str(),
                "text": t.text,
                "tokens": t.tokens,
            });
            writeln!(out, "{line}")?;
        }
        match next {
            // Pages only move forward, so this ends.
            Some(n) if n > from => from = n,
            Some(_) => bail!("the node's export did not advance"),
            None => return Ok(()),
        }
    }
}

fn ask(at: &Attach, op: MemoryOp) -> Result<MemoryReply> {
    let (rt, client, _) = crate::chat::connect(at)?;
    let reply = client::on_worker(&rt, async move { client.memory(op).await })
        .context("the memory task stopped abnormally")??;
    Ok(reply)
}
