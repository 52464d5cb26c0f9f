//! `dead-letters list`: the dead-letter queue's messages described, one line each, every one
//! left in place.

use std::fmt;
use std::time::SystemTime;

use super::DeadLetterError;
use super::letter::{Letter, human_age};
use super::link::Link;
use crate::config::AmqpSettings;

/// Widest error shown in a listing, in characters.
const ERROR_WIDTH: usize = 72;

/// What `list` found.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The dead-letter queue.
    pub queue: String,
    /// Messages it held when the listing started.
    pub depth: u32,
    /// The first of them, described.
    pub letters: Vec<Letter>,
}

impl fmt::Display for Listing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<[String; 4]> = self
            .letters
            .iter()
            .map(|l| {
                let id = match l.id_source.note() {
                    Some(note) => format!("{} ({note})", l.command_id),
                    None => l.command_id.clone(),
                };
                let age = l.age.map_or_else(|| "-".to_owned(), human_age);
                [id, l.event.clone(), age, shorten(&l.error, ERROR_WIDTH)]
            })
            .collect();
        let header = ["COMMAND ID", "EVENT", "AGE", "ERROR"].map(str::to_owned);
        let width = |i: usize| {
            rows.iter()
                .chain([&header])
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        };
        let (w0, w1, w2) = (width(0), width(1), width(2));
        for row in [&header].into_iter().chain(&rows) {
            let line = format!("{:w0$}  {:w1$}  {:w2$}  {}", row[0], row[1], row[2], row[3]);
            writeln!(f, "{}", line.trim_end())?;
        }
        let shown = self.letters.len();
        let depth = self.depth;
        if u32::try_from(shown).is_ok_and(|n| n == depth) {
            writeln!(f, "{depth} message(s) in {}", self.queue)
        } else {
            writeln!(f, "{shown} of {depth} message(s) in {} shown", self.queue)
        }
    }
}

/// The first `max` characters of `s` on one line, with an ellipsis if cut.
fn shorten(s: &str, max: usize) -> String {
    let line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.chars().count() <= max {
        return line;
    }
    let mut cut: String = line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}
/// Lists the dead-letter queue's messages, at most `limit`, leaving every one in place.
pub async fn list(amqp: &AmqpSettings, limit: Option<usize>) -> Result<Listing, DeadLetterError> {
    let link = Link::open(amqp, "transfer-worker dead-letters list").await?;
    let result = async {
        let depth = link.depth().await?;
        let wanted = limit.map_or(depth, |n| depth.min(u32::try_from(n).unwrap_or(u32::MAX)));
        let now = SystemTime::now();
        let mut letters = Vec::new();
        // Held unacked until the channel closes: each get returns the next message, never one
        // already read.
        for _ in 0..wanted {
            let Some(message) = link.get().await? else {
                break;
            };
            letters.push(Letter::read(&message.data, &message.properties, now));
        }
        Ok(Listing {
            queue: amqp.dead_letter_queue.clone(),
            depth,
            letters,
        })
    }
    .await;
    let expected = result.as_ref().ok().map(|listing| listing.depth);
    link.close(expected).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_shortened_to_one_line() {
        assert_eq!(shorten("a\nb", 10), "a b");
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("abcd", 4), "abcd");
    }
}
