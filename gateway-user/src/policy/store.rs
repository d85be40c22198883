//! The live policy set: a handle that sessions read without locks, swapped atomically on
//! reload. A reload validates everything first; on any error the last good set stays and
//! the error is logged and counted.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;

use super::{
    cache::{ClassKey, DecisionCache, Judgement},
    eval::{PolicySet, evaluate},
    load::{self, Report},
    model::{Operation, Request, Subject},
    sql::{Classification, LexOptions, classify, classify_read},
};
use crate::config::{Config, ConfigError, Diagnostic};

/// Reload outcomes, for status and metrics.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

pub struct PolicyStore {
    current: ArcSwap<PolicySet>,
    generation: AtomicU64,
    pub stats: ReloadStats,
    cache: DecisionCache,
    /// Classifications shared by statements that differ only in literals.
    shapes: super::sql::ShapeCache,
    /// Judgements of known shapes by quick key: rules see a statement only through its
    /// classification, so one shape, one caller class and one policy generation make one
    /// decision.
    shape_decisions: DecisionCache,
}

/// Loads the policies a configuration names; errors are every diagnostic.
/// Files someone but root may change are refused like invalid ones
/// ([`load::check_files`]).
pub fn load_set(cfg: &Config) -> Result<(PolicySet, Vec<Diagnostic>), ConfigError> {
    let sources = load::sources(cfg).map_err(|d| ConfigError::Invalid(vec![d]))?;
    let (set, mut report) = load::load(&sources, cfg);
    if let Some(dir) = &cfg.policy.dir {
        load::check_files(dir, &sources, &mut report);
    }
    let Report { errors, warnings } = report;
    match set {
        Some(set) if errors.is_empty() => Ok((set, warnings)),
        _ => Err(ConfigError::Invalid(errors)),
    }
}

impl PolicyStore {
    pub fn new(set: PolicySet, cache_entries: usize) -> Self {
        Self {
            current: ArcSwap::from_pointee(set),
            generation: AtomicU64::new(1),
            stats: ReloadStats::default(),
            cache: DecisionCache::new(cache_entries),
            shapes: Default::default(),
            shape_decisions: DecisionCache::new(cache_entries),
        }
    }

    /// Loads at start: a missing or broken policy is a hard error, never "allow all".
    pub fn open(cfg: &Config) -> Result<Self, ConfigError> {
        let (set, warnings) = load_set(cfg)?;
        for w in &warnings {
            tracing::warn!(warning = %w, "policy");
        }
        tracing::info!(
            rules = set.rules.len(),
            files = set.sources.len(),
            "policies loaded"
        );
        Ok(Self::new(set, cfg.policy.cache_entries))
    }

    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Validates the policies of `cfg` and swaps them in; on error keeps the running set.
    pub fn reload(&self, cfg: &Config) -> Result<usize, ConfigError> {
        match load_set(cfg) {
            Ok((set, warnings)) => {
                for w in &warnings {
                    tracing::warn!(warning = %w, "policy");
                }
                let n = set.rules.len();
                self.current.store(Arc::new(set));
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.stats.ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(rules = n, result = "ok", "policies reloaded");
                Ok(n)
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    result = "error",
                    error = %e,
                    "policy reload failed; the previous policies stay in force"
                );
                Err(e)
            }
        }
    }

    /// The cache class of a caller: everything rules can look at.
    pub fn class_of(&self, subject: &Subject, target: &str, protocol: &str) -> ClassKey {
        self.cache.class_key((subject, target, protocol))
    }

    /// Classifies and decides a SQL message, through the cache.
    pub fn judge_sql(
        &self,
        class: ClassKey,
        subject: &Subject,
        target: &str,
        protocol: &str,
        sql: &str,
        lex: LexOptions,
    ) -> Arc<Judgement> {
        let generation = self.generation();
        // Text such an encoding may read otherwise is judged as it is refused, uncached.
        if lex.may_misread(sql) {
            let set = self.current();
            return Arc::new(decide(&set, subject, target, protocol, classify(sql, lex)));
        }
        // The lexical options change how text reads: part of the key.
        let class = if lex.standard_conforming_strings {
            class
        } else {
            ClassKey(class.0 ^ 0x9e37_79b9_7f4a_7c15)
        };
        if let Some(j) = self.cache.get(generation, class, sql) {
            return j;
        }
        // Read once with the quick lexer, for both the decision and the classification.
        let quick = super::sql::quick::read(sql, lex.standard_conforming_strings);
        if let Some(q) = &quick
            && let Some(j) = self.shape_decisions.get(generation, class, &q.key)
        {
            return j;
        }
        let set = self.current();
        let classification = classify_read(sql, lex, Some(&self.shapes), quick.as_ref());
        let j = Arc::new(decide(&set, subject, target, protocol, classification));
        // A known shape, and this is the classification stored for it.
        if let Some(q) = &quick
            && self.shapes.get(&q.key).is_some_and(
                |c| matches!(j.classification.statements.as_slice(), [one] if *one == *c),
            )
        {
            self.shape_decisions
                .put(generation, class, &q.key, j.clone());
        }
        // By text too: an exact repeat then costs no scan (a long statement's quick key is
        // not free).
        self.cache.put(generation, class, sql, j.clone());
        j
    }

    pub fn cached_decisions(&self) -> usize {
        self.cache.len()
    }

    /// Decisions kept by shape (see `shape_decisions`).
    pub fn cached_shape_decisions(&self) -> usize {
        self.shape_decisions.len()
    }
}

/// Classifies and decides without a cache (pure).
pub fn judge(
    set: &PolicySet,
    subject: &Subject,
    target: &str,
    protocol: &str,
    sql: &str,
    lex: LexOptions,
) -> Judgement {
    decide(set, subject, target, protocol, classify(sql, lex))
}

/// Decides on a classified message (pure).
fn decide(
    set: &PolicySet,
    subject: &Subject,
    target: &str,
    protocol: &str,
    classification: Classification,
) -> Judgement {
    let decision = evaluate(
        set,
        &Request {
            subject,
            target,
            protocol,
            operation: Operation::Sql(&classification),
        },
    );
    Judgement {
        kind_names: classification.kinds().iter().map(|k| k.name()).collect(),
        classification,
        decision,
    }
}

/// What the policy directory looks like now: names, sizes and modification times. A change
/// in any of them means a reload.
pub fn fingerprint(cfg: &Config) -> Vec<(PathBuf, u64, u128)> {
    let Some(dir) = &cfg.policy.dir else {
        return Vec::new();
    };
    let mut v: Vec<(PathBuf, u64, u128)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let md = e.metadata().ok()?;
            let mtime = md
                .modified()
                .ok()?
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            Some((e.path(), md.len(), mtime))
        })
        .collect();
    if dir.is_file()
        && let Ok(md) = std::fs::metadata(dir)
    {
        let mtime = md
            .modified()
            .unwrap_or(SystemTime::UNIX_EPOCH)
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        v.push((dir.clone(), md.len(), mtime));
    }
    v.sort();
    v
}
