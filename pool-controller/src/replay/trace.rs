//! Production traces for the replay: the Azure LLM inference trace CSV
//! (`TIMESTAMP,ContextTokens,GeneratedTokens`, timestamps like `2023-11-16 18:15:46.6805900`) and
//! Mooncake's JSON lines (`timestamp` in ms, `input_length`, `output_length`, `hash_ids` of
//! 512-token prefix blocks). The format is told from the first line. A bad row is an error with
//! its line number; times are made relative to the first request and sorted.

use std::path::Path;

/// One request of a trace.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceRequest {
    /// Seconds after the trace's first request.
    pub at: f64,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    /// Prefix-affinity key (Mooncake: the first prefix block's hash id), as the gateway would
    /// hash the prompt's first bytes.
    pub affinity: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Row {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}: no requests")]
    Empty { path: String },
}

/// Reads a trace file (either format).
pub fn load(path: &Path) -> Result<Vec<TraceRequest>, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses trace text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Vec<TraceRequest>, TraceError> {
    let row_error = |line: usize, message: String| TraceError::Row {
        path: origin.to_owned(),
        line,
        message,
    };
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let mut rows = if first.trim_start().starts_with('{') {
        mooncake(text, &row_error)?
    } else {
        azure(text, &row_error)?
    };
    if rows.is_empty() {
        return Err(TraceError::Empty {
            path: origin.to_owned(),
        });
    }
    rows.sort_by(|a, b| a.at.total_cmp(&b.at));
    let t0 = rows[0].at;
    for r in &mut rows {
        r.at -= t0;
    }
    Ok(rows)
}

type RowError<'a> = &'a dyn Fn(usize, String) -> TraceError;

fn azure(text: &str, row_error: RowError<'_>) -> Result<Vec<TraceRequest>, TraceError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Ok(Vec::new());
    };
    let columns: Vec<&str> = header.split(',').map(str::trim).collect();
    let index = |name: &str| {
        columns
            .iter()
            .position(|c| c.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                row_error(
                    1,
                    format!("the header has no `{name}` column (want TIMESTAMP,ContextTokens,GeneratedTokens, or Mooncake JSON lines)"),
                )
            })
    };
    let (ti, ci, gi) = (
        index("TIMESTAMP")?,
        index("ContextTokens")?,
        index("GeneratedTokens")?,
    );
    let mut out = Vec::new();
    for (i, line) in lines {
        let n = i + 1;
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != columns.len() {
            return Err(row_error(
                n,
                format!("{} fields, the header has {}", fields.len(), columns.len()),
            ));
        }
        let tokens = |j: usize, name: &str| {
            fields[j]
                .parse::<u32>()
                .map_err(|_| row_error(n, format!("`{name}` = {:?}: not a token count", fields[j])))
        };
        out.push(TraceRequest {
            at: timestamp(fields[ti]).ok_or_else(|| {
                row_error(
                    n,
                    format!(
                        "`TIMESTAMP` = {:?}: not a time like 2023-11-16 18:15:46.68",
                        fields[ti]
                    ),
                )
            })?,
            prompt_tokens: tokens(ci, "ContextTokens")?,
            output_tokens: tokens(gi, "GeneratedTokens")?,
            affinity: None,
        });
    }
    Ok(out)
}

/// `YYYY-MM-DD HH:MM:SS[.fraction]` as seconds since an arbitrary epoch (days are counted by
/// a civil-calendar formula, so a trace may cross midnight or a month's end).
fn timestamp(text: &str) -> Option<f64> {
    let (date, time) = text.split_once([' ', 'T'])?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.trim_end_matches('Z').splitn(3, ':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let sec = t.next()?.parse::<f64>().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || !(0.0..24.0).contains(&h) {
        return None;
    }
    if !(0.0..60.0).contains(&min) || !(0.0..61.0).contains(&sec) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + sec)
}

#[derive(serde::Deserialize)]
struct MooncakeRow {
    timestamp: f64,
    input_length: u32,
    output_length: u32,
    #[serde(default)]
    hash_ids: Vec<u64>,
}

fn mooncake(text: &str, row_error: RowError<'_>) -> Result<Vec<TraceRequest>, TraceError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: MooncakeRow =
            serde_json::from_str(line).map_err(|e| row_error(i + 1, e.to_string()))?;
        if !row.timestamp.is_finite() || row.timestamp < 0.0 {
            return Err(row_error(
                i + 1,
                format!("`timestamp` = {}: not a time in ms", row.timestamp),
            ));
        }
        out.push(TraceRequest {
            at: row.timestamp / 1000.0,
            prompt_tokens: row.input_length,
            output_tokens: row.output_length,
            affinity: row.hash_ids.first().copied(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_rows_become_relative_times_across_midnight() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
                    2023-12-31 23:59:59.5000000,374,44\n\
                    2024-01-01 00:00:01.0000000,10,2\n\
                    2023-12-31 23:59:59.0000000,5,1\n";
        let rows = parse(text, "t.csv").unwrap();
        let at: Vec<f64> = rows.iter().map(|r| r.at).collect();
        assert_eq!(at, [0.0, 0.5, 2.0]);
        assert_eq!((rows[1].prompt_tokens, rows[1].output_tokens), (374, 44));
    }

    #[test]
    fn mooncake_lines_carry_the_first_block_as_affinity() {
        let text = "{\"timestamp\": 1500, \"input_length\": 1024, \"output_length\": 8, \"hash_ids\": [7, 8]}\n\
                    {\"timestamp\": 500, \"input_length\": 10, \"output_length\": 3, \"hash_ids\": []}\n";
        let rows = parse(text, "m.jsonl").unwrap();
        assert_eq!(rows[0].affinity, None);
        assert_eq!((rows[1].at, rows[1].affinity), (1.0, Some(7)));
    }

    #[test]
    fn bad_rows_name_their_line() {
        let cases = [
            (
                "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6,374,44\n2023-11-16 18:15:47,x,1\n",
                "t:3: `ContextTokens`",
            ),
            (
                "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6,374\n",
                "t:2: 2 fields",
            ),
            (
                "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-13-16 18:15:46.6,1,1\n",
                "t:2: `TIMESTAMP`",
            ),
            ("time,in,out\n1,2,3\n", "t:1: the header has no `TIMESTAMP`"),
            (
                "{\"timestamp\": 1, \"input_length\": 2, \"output_length\": 3}\n{\"timestamp\": 1}\n",
                "t:2: missing field",
            ),
            (
                "{\"timestamp\": -4, \"input_length\": 2, \"output_length\": 3}\n",
                "t:1: `timestamp`",
            ),
            (
                "TIMESTAMP,ContextTokens,GeneratedTokens\n",
                "t: no requests",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text, "t").unwrap_err().to_string();
            assert!(err.starts_with(want), "{err:?} should start with {want:?}");
        }
    }
}
