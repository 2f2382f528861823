//! `syncctl queue create|publish|consume|ack|nack|extend|requeue|stats|purge|redrive|tail|list`.
//!
//! Everything goes through the SDK (`sync-client`), which routes each call to the node that
//! serves it (the leader for writes, the topic's owner for consumes) and retries with the same
//! request header, so a retried publish stores its message once. `ack`, `nack` and `extend`
//! act on a delivery known by its receipt (message id + attempt), as `consume` prints it.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;
use sync_client::api::TopicSettings;
use sync_client::{Client, Delivery, OutgoingMessage};

use crate::args::{
    GlobalOpts, Output, QueueCommand, QueueConsumeArgs, QueueCreateArgs, QueuePublishArgs,
    QueueRedriveArgs, QueueTailArgs,
};
use crate::cluster::sdk_client;
use crate::input::payload;
use crate::output::{
    bytes_cell, millis, print_json, print_json_line, table, text_or_hex, three_digits, unix_ms,
};

/// The long-poll wait of each call `queue tail` makes.
const TAIL_POLL: Duration = Duration::from_secs(5);

pub async fn run(global: &GlobalOpts, command: &QueueCommand) -> anyhow::Result<()> {
    let client = sdk_client(global).await?;
    let output = global.output;
    match command {
        QueueCommand::Create(args) => create(&client, output, args).await,
        QueueCommand::Publish(args) => publish(&client, output, args).await,
        QueueCommand::Consume(args) => consume(&client, output, args).await,
        QueueCommand::Ack(r) => {
            let d = client.delivery(&r.topic, &r.message_id, r.attempt);
            d.ack().await?;
            done(output, "acked", &d, None)
        }
        QueueCommand::Nack(args) => {
            let r = &args.receipt;
            let d = client.delivery(&r.topic, &r.message_id, r.attempt);
            d.nack(args.delay).await?;
            done(output, "nacked", &d, None)
        }
        QueueCommand::Extend(args) => {
            let r = &args.receipt;
            let d = client.delivery(&r.topic, &r.message_id, r.attempt);
            let until = d.extend(args.visibility).await?;
            done(output, "extended", &d, Some(until))
        }
        QueueCommand::Requeue(t) => {
            let n = client.requeue_expired(&t.topic).await?;
            counted(output, &t.topic, "requeued", n)
        }
        QueueCommand::Purge(t) => {
            let n = client.purge(&t.topic).await?;
            counted(output, &t.topic, "purged", n)
        }
        QueueCommand::Redrive(args) => redrive(&client, output, args).await,
        QueueCommand::Stats(t) => stats(&client, output, &t.topic).await,
        QueueCommand::Tail(args) => tail(&client, output, args).await,
        QueueCommand::List(p) => list(&client, output, &p.prefix).await,
    }
}

fn ms(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| d.as_millis() as u64)
}

/// A topic's settings as `create` and `list` print them (0: the server's default).
#[derive(Serialize)]
struct Settings {
    visibility_timeout_ms: u64,
    max_deliveries: u32,
    dead_letter_topic: String,
    retention_max_messages: u64,
    retention_max_bytes: u64,
    retention_max_age_ms: u64,
    max_message_bytes: u64,
    dedup_window_ms: u64,
}

impl From<&TopicSettings> for Settings {
    fn from(s: &TopicSettings) -> Self {
        Settings {
            visibility_timeout_ms: s.visibility_timeout_ms,
            max_deliveries: s.max_deliveries,
            dead_letter_topic: s.dead_letter_topic.clone(),
            retention_max_messages: s.retention_max_messages,
            retention_max_bytes: s.retention_max_bytes,
            retention_max_age_ms: s.retention_max_age_ms,
            max_message_bytes: s.max_message_bytes,
            dedup_window_ms: s.dedup_window_ms,
        }
    }
}

async fn create(client: &Client, output: Output, args: &QueueCreateArgs) -> anyhow::Result<()> {
    let settings = TopicSettings {
        visibility_timeout_ms: ms(args.visibility),
        max_deliveries: args.max_deliveries.unwrap_or(0),
        dead_letter_topic: args.dead_letter.clone().unwrap_or_default(),
        retention_max_messages: args.max_messages.unwrap_or(0),
        retention_max_bytes: args.max_bytes.unwrap_or(0),
        retention_max_age_ms: ms(args.max_age),
        max_message_bytes: args.max_message_bytes.unwrap_or(0),
        dedup_window_ms: ms(args.dedup_window),
    };
    let created = client.create_topic(&args.topic, settings.clone()).await?;
    match output {
        Output::Json => print_json(&serde_json::json!({
            "topic": args.topic,
            "created": created,
            "settings": Settings::from(&settings),
        })),
        Output::Table => {
            let what = if created {
                "created"
            } else {
                "already exists with these settings"
            };
            println!("topic {} {what}", args.topic);
            Ok(())
        }
    }
}

async fn publish(client: &Client, output: Output, args: &QueuePublishArgs) -> anyhow::Result<()> {
    let mut message = OutgoingMessage::new(payload(
        args.message.as_deref(),
        args.file.as_deref(),
        "the message",
    )?);
    if let Some(key) = &args.key {
        message = message.ordering_key(key);
    }
    if let Some(id) = &args.dedup_id {
        message = message.dedup_id(id);
    }
    if let Some(delay) = args.delay {
        message = message.delay(delay);
    }
    for (k, v) in &args.attributes {
        message = message.attribute(k, v);
    }
    let published = client.publish(&args.topic, message).await?;
    match output {
        Output::Json => print_json(&serde_json::json!({
            "topic": args.topic,
            "message_id": published.message_id,
            "deduplicated": published.deduplicated,
        })),
        Output::Table => {
            let note = if published.deduplicated {
                " (deduplicated: nothing new stored)"
            } else {
                ""
            };
            println!("{}{note}", published.message_id);
            Ok(())
        }
    }
}

/// A delivery as `consume` and `tail` print it. The payload is text if it is UTF-8, otherwise
/// hex in `payload_hex`.
#[derive(Serialize)]
struct Printed {
    topic: String,
    message_id: String,
    attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_hex: Option<String>,
    ordering_key: String,
    attributes: BTreeMap<String, String>,
    publish_unix_ms: u64,
    visible_again_unix_ms: u64,
    acked: bool,
}

impl Printed {
    fn of(d: &Delivery, acked: bool) -> Printed {
        let (payload, payload_hex) = text_or_hex(d.payload());
        Printed {
            topic: d.topic().to_owned(),
            message_id: d.message_id().to_owned(),
            attempt: d.attempt(),
            payload,
            payload_hex,
            ordering_key: d.ordering_key().to_owned(),
            attributes: d.attributes().clone().into_iter().collect(),
            publish_unix_ms: d.raw().publish_unix_ms,
            visible_again_unix_ms: d.raw().visible_again_unix_ms,
            acked,
        }
    }

    fn payload_text(&self) -> String {
        bytes_cell(self.payload.as_deref(), self.payload_hex.as_deref())
    }
}

fn delivery_table() -> comfy_table::Table {
    table(
        &["message id", "attempt", "key", "payload", "visible again"],
        &["attempt"],
    )
}

fn delivery_row(p: &Printed) -> Vec<String> {
    vec![
        p.message_id.clone(),
        p.attempt.to_string(),
        if p.ordering_key.is_empty() {
            "-".to_owned()
        } else {
            p.ordering_key.clone()
        },
        p.payload_text(),
        if p.acked {
            "acked".to_owned()
        } else {
            unix_ms(p.visible_again_unix_ms)
        },
    ]
}

async fn consume(client: &Client, output: Output, args: &QueueConsumeArgs) -> anyhow::Result<()> {
    let mut consumer = client.consumer(&args.topic).batch(args.max).wait(args.wait);
    if let Some(v) = args.visibility {
        consumer = consumer.visibility(v);
    }
    let deliveries = consumer.receive().await?;
    // `--ack` acknowledges the whole batch in one replicated command; each delivery is shown
    // as acked or not, and a refused one fails the command after the output.
    let outcomes = if args.ack && !deliveries.is_empty() {
        client
            .ack_batch(&deliveries)
            .await
            .context("acking the deliveries")?
    } else {
        Vec::new()
    };
    let acked = |i: usize| outcomes.get(i).is_some_and(Result::is_ok);
    let printed: Vec<Printed> = (deliveries.iter().enumerate())
        .map(|(i, d)| Printed::of(d, acked(i)))
        .collect();
    let refused = deliveries
        .iter()
        .zip(&outcomes)
        .find_map(|(d, o)| o.as_ref().err().map(|e| (d.message_id(), e)));
    print_deliveries(output, &args.topic, &printed)?;
    match refused {
        Some((id, e)) => anyhow::bail!("acking message {id}: {e}"),
        None => Ok(()),
    }
}

/// Prints what `consume` received.
fn print_deliveries(output: Output, topic: &str, printed: &[Printed]) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(&serde_json::json!({ "deliveries": printed })),
        Output::Table => {
            if printed.is_empty() {
                eprintln!("no message in {topic}");
                return Ok(());
            }
            let mut t = delivery_table();
            for p in printed {
                t.add_row(delivery_row(p));
            }
            println!("{t}");
            Ok(())
        }
    }
}

/// What `ack`, `nack` and `extend` print.
fn done(output: Output, what: &str, d: &Delivery, until: Option<u64>) -> anyhow::Result<()> {
    match output {
        Output::Json => {
            let mut value = serde_json::json!({
                "topic": d.topic(),
                "message_id": d.message_id(),
                "attempt": d.attempt(),
                what: true,
            });
            if let Some(until) = until {
                value["visible_again_unix_ms"] = until.into();
            }
            print_json(&value)
        }
        Output::Table => {
            match until {
                Some(until) => println!(
                    "{what} {} in {}: invisible until {}",
                    d.message_id(),
                    d.topic(),
                    unix_ms(until)
                ),
                None => println!("{what} {} in {}", d.message_id(), d.topic()),
            }
            Ok(())
        }
    }
}

/// What `requeue`, `purge` and `redrive` print: how many messages they moved.
fn counted(output: Output, topic: &str, what: &str, n: u64) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(&serde_json::json!({ "topic": topic, what: n })),
        Output::Table => {
            println!("{what} {n} message(s) in {topic}");
            Ok(())
        }
    }
}

async fn redrive(client: &Client, output: Output, args: &QueueRedriveArgs) -> anyhow::Result<()> {
    let to = args.to.as_deref().unwrap_or("");
    let moved = client.redrive(&args.dead_letters, to, args.max).await?;
    counted(output, &args.dead_letters, "moved", moved)
}

/// A topic's counts, as `stats` prints them.
#[derive(Serialize)]
struct Stats {
    topic: String,
    visible: u64,
    in_flight: u64,
    delayed: u64,
    dead_lettered: u64,
    oldest_age_ms: u64,
    bytes: u64,
    publish_rate: f64,
    ack_rate: f64,
    owner_node_id: u64,
    owner_address: String,
}

async fn stats(client: &Client, output: Output, topic: &str) -> anyhow::Result<()> {
    let s = client.topic_stats(topic).await?;
    let s = Stats {
        topic: s.topic,
        visible: s.visible,
        in_flight: s.in_flight,
        delayed: s.delayed,
        dead_lettered: s.dead_lettered,
        oldest_age_ms: s.oldest_age_ms,
        bytes: s.bytes,
        publish_rate: s.publish_rate,
        ack_rate: s.ack_rate,
        owner_node_id: s.owner_node_id,
        owner_address: s.owner_address,
    };
    match output {
        Output::Json => print_json(&s),
        Output::Table => {
            let mut t = table(
                &[
                    "topic",
                    "visible",
                    "in flight",
                    "delayed",
                    "dead",
                    "oldest",
                    "publish/s",
                    "ack/s",
                    "owner",
                ],
                &[
                    "visible",
                    "in flight",
                    "delayed",
                    "dead",
                    "publish/s",
                    "ack/s",
                ],
            );
            t.add_row(vec![
                s.topic.clone(),
                s.visible.to_string(),
                s.in_flight.to_string(),
                s.delayed.to_string(),
                s.dead_lettered.to_string(),
                millis(s.oldest_age_ms),
                three_digits(s.publish_rate),
                three_digits(s.ack_rate),
                format!("{} ({})", s.owner_node_id, s.owner_address),
            ]);
            println!("{t}");
            Ok(())
        }
    }
}

async fn tail(client: &Client, output: Output, args: &QueueTailArgs) -> anyhow::Result<()> {
    let mut consumer = client.consumer(&args.topic).batch(10).wait(TAIL_POLL);
    if let Some(v) = args.visibility {
        consumer = consumer.visibility(v);
    }
    let mut deliveries = Box::pin(consumer.stream());
    let mut header = output == Output::Table;
    loop {
        let next = tokio::select! {
            next = deliveries.next() => next,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(next) = next else {
            anyhow::bail!("the consumer stream of {} ended; tail again", args.topic);
        };
        let d = match next {
            Ok(d) => d,
            Err(e) => {
                // The stream polls again after an error; say so, on one line.
                eprintln!("warning: {e}");
                continue;
            }
        };
        if !args.no_ack {
            d.ack()
                .await
                .with_context(|| format!("acking message {}", d.message_id()))?;
        }
        let printed = Printed::of(&d, !args.no_ack);
        match output {
            Output::Json => print_json_line(&printed)?,
            Output::Table => {
                if std::mem::take(&mut header) {
                    println!("{}", tail_line(None));
                }
                println!("{}", tail_line(Some(&printed)));
            }
        }
    }
}

/// A line of the `queue tail` table (the header for `None`). Columns have fixed widths, as the
/// rows are printed one at a time; the payload comes last, whole.
fn tail_line(p: Option<&Printed>) -> String {
    let [id, attempt, key, payload] = match p {
        None => ["MESSAGE ID", "ATTEMPT", "KEY", "PAYLOAD"].map(str::to_owned),
        Some(p) => {
            let row = delivery_row(p);
            [
                row[0].clone(),
                row[1].clone(),
                row[2].clone(),
                row[3].clone(),
            ]
        }
    };
    format!("{id:<24} {attempt:>7} {key:<16} {payload}")
        .trim_end()
        .to_owned()
}

async fn list(client: &Client, output: Output, prefix: &str) -> anyhow::Result<()> {
    let topics = client.list_topics(prefix).await?;
    #[derive(Serialize)]
    struct Listed {
        name: String,
        created_unix_ms: u64,
        settings: Settings,
    }
    let listed: Vec<Listed> = topics
        .iter()
        .map(|t| Listed {
            name: t.name.clone(),
            created_unix_ms: t.created_unix_ms,
            settings: Settings::from(&t.settings.clone().unwrap_or_default()),
        })
        .collect();
    match output {
        Output::Json => print_json(&serde_json::json!({ "topics": listed })),
        Output::Table => {
            let mut t = table(
                &[
                    "name",
                    "visibility",
                    "max deliveries",
                    "dead letter",
                    "created",
                ],
                &["max deliveries"],
            );
            for l in &listed {
                let s = &l.settings;
                t.add_row(vec![
                    l.name.clone(),
                    millis(s.visibility_timeout_ms),
                    s.max_deliveries.to_string(),
                    if s.dead_letter_topic.is_empty() {
                        "-".to_owned()
                    } else {
                        s.dead_letter_topic.clone()
                    },
                    unix_ms(l.created_unix_ms),
                ]);
            }
            println!("{t}");
            Ok(())
        }
    }
}
