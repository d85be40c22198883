//! The `LISTEN`s of a session, and what its notifications get. A notification carries a
//! payload another session chose (a trigger's `pg_notify('ch', NEW.email)`), so it is
//! masked by the masks its `LISTEN` was judged under. A policy reload applies to it as to
//! prepared statements: the `LISTEN`s are judged again under the new policies at the next
//! notification, and their new masks apply; one the new policies deny stops the session's
//! notifications (one they would hold for approval has had it, or never ran).
//!
//! Pure: judging is a function passed in.

use std::sync::Arc;

use crate::policy::model::MaskSpec;

/// Texts of listening statements kept for judging again. Past this many, the masks of the
/// ones not kept still apply (they are never dropped by a reload).
pub const MAX_LISTENS: usize = 64;

/// What a notification gets.
#[derive(Debug, PartialEq)]
pub enum Notify {
    /// As it is: the session's `LISTEN`s have no masks (or it never listened through the
    /// gate).
    Pass,
    /// Masked by these.
    Mask(Vec<Arc<MaskSpec>>),
    /// Not delivered: the policies deny a `LISTEN` of the session now.
    Drop,
}

#[derive(Debug, Default)]
pub struct Listens {
    sql: Vec<Arc<str>>,
    /// More listening statements than [`MAX_LISTENS`] were sent.
    overflow: bool,
    masks: Vec<Arc<MaskSpec>>,
    refused: bool,
    /// The policy generation `masks` come from; `None`: judge again.
    generation: Option<u64>,
}

impl Listens {
    /// A statement that listens, judged under policy `generation` with these masks, and
    /// sent to the server (a refused one never listened).
    pub fn add(&mut self, sql: &Arc<str>, masks: &[Arc<MaskSpec>], generation: u64) {
        if self.sql.is_empty() && !self.overflow {
            self.generation = Some(generation);
        } else if self.generation != Some(generation) {
            self.generation = None;
        }
        union(&mut self.masks, masks);
        if !self.sql.contains(sql) {
            if self.sql.len() < MAX_LISTENS {
                self.sql.push(sql.clone());
            } else {
                self.overflow = true;
            }
        }
    }

    /// What a notification gets under policy `generation`. When it is not the one the
    /// `LISTEN`s were judged under, each is judged again: `judge` gives a statement's masks
    /// under the current policies, `None` when they refuse it.
    pub fn notify(
        &mut self,
        generation: u64,
        judge: &dyn Fn(&str) -> Option<Vec<Arc<MaskSpec>>>,
    ) -> Notify {
        if self.sql.is_empty() && !self.overflow {
            return Notify::Pass;
        }
        if self.generation != Some(generation) {
            let mut masks = Vec::new();
            let mut refused = false;
            for sql in &self.sql {
                match judge(sql) {
                    Some(m) => union(&mut masks, &m),
                    None => refused = true,
                }
            }
            if self.overflow {
                let kept = std::mem::take(&mut self.masks);
                union(&mut masks, &kept);
            }
            self.masks = masks;
            self.refused = refused;
            self.generation = Some(generation);
        }
        if self.refused {
            Notify::Drop
        } else if self.masks.is_empty() {
            Notify::Pass
        } else {
            Notify::Mask(self.masks.clone())
        }
    }
}

fn union(into: &mut Vec<Arc<MaskSpec>>, from: &[Arc<MaskSpec>]) {
    for m in from {
        if !into.iter().any(|x| x == m) {
            into.push(m.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{Strategy, Unresolved};

    fn mask(rule: &str) -> Arc<MaskSpec> {
        Arc::new(MaskSpec {
            rule: rule.into(),
            columns: Vec::new(),
            detectors: vec!["email".into()],
            strategy: Strategy::Redact { text: None },
            unresolved: Unresolved::MaskAll,
        })
    }

    fn rules(n: &Notify) -> Vec<String> {
        match n {
            Notify::Mask(m) => m.iter().map(|m| m.rule.clone()).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn masks_are_those_the_listens_were_judged_under_until_the_policies_change() {
        let mut l = Listens::default();
        let never = |_: &str| -> Option<Vec<Arc<MaskSpec>>> { panic!("judged again") };
        assert_eq!(l.notify(1, &never), Notify::Pass);
        l.add(&"LISTEN a".into(), &[mask("m1")], 1);
        l.add(&"LISTEN b".into(), &[mask("m1"), mask("m2")], 1);
        l.add(&"LISTEN a".into(), &[], 1);
        assert_eq!(rules(&l.notify(1, &never)), ["m1", "m2"]);
        // A reload: judged again, and the new decisions replace the old.
        let judged = |sql: &str| {
            Some(if sql == "LISTEN a" {
                vec![mask("m3")]
            } else {
                vec![]
            })
        };
        assert_eq!(rules(&l.notify(2, &judged)), ["m3"]);
        assert_eq!(rules(&l.notify(2, &never)), ["m3"]);
        // A policy that refuses one of them stops notifications.
        let refuse_b = |sql: &str| (sql != "LISTEN b").then(Vec::new);
        assert_eq!(l.notify(3, &refuse_b), Notify::Drop);
        // A LISTEN judged under another generation than the rest: all judged again.
        l.add(&"LISTEN c".into(), &[mask("m4")], 4);
        let all = |_: &str| Some(vec![mask("m5")]);
        assert_eq!(rules(&l.notify(4, &all)), ["m5"]);
        let unmasked = |_: &str| Some(Vec::new());
        assert_eq!(l.notify(5, &unmasked), Notify::Pass);
    }

    #[test]
    fn masks_of_listens_past_the_limit_are_kept_across_reloads() {
        let mut l = Listens::default();
        for i in 0..=MAX_LISTENS {
            let masks = if i == MAX_LISTENS {
                vec![mask("late")]
            } else {
                vec![]
            };
            l.add(&format!("LISTEN c{i}").into(), &masks, 1);
        }
        let none = |_: &str| Some(Vec::new());
        assert_eq!(rules(&l.notify(2, &none)), ["late"]);
    }
}
