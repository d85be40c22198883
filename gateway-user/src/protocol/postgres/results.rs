//! Results on their way to the client: masking, row by row.
//!
//! The server → client pump hands every message that belongs to a result here, with the
//! judgement of the statement it answers. A result set of a statement with masks gets a
//! [`ResultPlan`] when its description arrives (RowDescription — for the extended
//! protocol, of a Describe the engine injects after Bind — or CopyOutResponse); each
//! DataRow or CopyData is then rewritten by the plan. Nothing is buffered beyond the
//! message at hand. A result that cannot be masked as the policy asks ends the session
//! with a FATAL error rather than let a value through.

use std::{collections::HashMap, sync::Arc};

use bytes::{BufMut as _, BytesMut};

use super::{
    PgShared,
    catalog::Catalog,
    codec::Frame,
    expect::{Bound, Ctx, Owner},
    messages::{self, be},
};
use crate::{
    masking::{
        plan::{self, Field, NoCatalog, Refusal, Resolve, ResultPlan},
        rows::{CopyMasker, mask_data_row},
        types::{Types, learnable},
    },
    policy::{
        model::MaskSpec,
        sql::lineage::{Item, Shape, StarSource},
    },
};

/// Why a result was not let through.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Malformed(String),
}

/// The masks that apply to a statement's results, and its shape.
pub struct Applies {
    pub masks: Vec<Arc<MaskSpec>>,
    /// The judged message whose statement gives the result its shape, and that statement;
    /// `None`: the shape is unknown. Held rather than copied: shapes are trees.
    source: Option<(Ctx, usize)>,
}

impl Applies {
    pub fn shape(&self) -> &Shape {
        static UNKNOWN: Shape = Shape::Unknown;
        self.source
            .as_ref()
            .and_then(|(j, k)| j.classification.statements.get(*k))
            .map_or(&UNKNOWN, |s| &s.shape)
    }
}

/// Looks up what a SQL-level prepared statement was judged.
/// A prepared statement by name: its judgement and which of its statements it is.
pub type Prepared<'a> = dyn Fn(&str) -> Option<(Ctx, usize)> + Sync + 'a;

/// The masks and shape of statement `k` of a judged message; `EXECUTE name` takes the
/// prepared statement's. `None`: nothing to mask.
pub fn applies(
    j: &Ctx,
    k: usize,
    prepared: &dyn Fn(&str) -> Option<(Ctx, usize)>,
) -> Option<Applies> {
    let mut masks = j.decision.masks.clone();
    let statement = j.classification.statements.get(k);
    let mut source = statement.map(|_| (j.clone(), k));
    if let Some(Shape::Execute(name)) = statement.map(|s| &s.shape) {
        source = prepared(name).map(|(p, at)| {
            for m in &p.decision.masks {
                if !masks.iter().any(|x| Arc::ptr_eq(x, m)) {
                    masks.push(m.clone());
                }
            }
            (p, at)
        });
    }
    (!masks.is_empty()).then_some(Applies { masks, source })
}

/// Tables a plan may need from the catalog: OIDs from the description, names from the
/// statement.
pub(super) fn wanted(shape: &Shape, fields: &[Field]) -> (Vec<u32>, Vec<String>) {
    let oids = fields
        .iter()
        .filter(|f| f.table_oid != 0)
        .map(|f| f.table_oid)
        .collect();
    let mut names = Vec::new();
    if let Shape::Rows(items) | Shape::Copy { items, .. } = shape {
        for i in items {
            match i {
                Item::Star(StarSource::Relation(t)) => names.push(t.name.clone()),
                Item::Column { deps, .. } | Item::Star(StarSource::Deps(deps)) => {
                    names.extend(deps.columns.iter().map(|c| c.table.name.clone()));
                }
            }
        }
    }
    (oids, names)
}

/// The inputs of the last plan made, kept to recognise the next statement that has them.
struct PlanKey {
    row_description: Vec<u8>,
    masks: Vec<usize>,
    shape: Shape,
    catalog_generation: u64,
    ddl_pending: bool,
    system_names: bool,
}

/// A plan's inputs as borrowed from the statement: compared with the last plan's key in
/// place, copied into one only when a new plan is kept.
struct PlanInputs<'a> {
    row_description: &'a [u8],
    masks: &'a [Arc<MaskSpec>],
    shape: &'a Shape,
    catalog_generation: u64,
    ddl_pending: bool,
    system_names: bool,
}

impl PlanInputs<'_> {
    fn mask_ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.masks.iter().map(|m| Arc::as_ptr(m) as usize)
    }

    fn are(&self, k: &PlanKey) -> bool {
        k.row_description == self.row_description
            && k.masks.iter().copied().eq(self.mask_ids())
            && k.catalog_generation == self.catalog_generation
            && k.ddl_pending == self.ddl_pending
            && k.system_names == self.system_names
            && k.shape == *self.shape
    }

    fn key(&self) -> PlanKey {
        PlanKey {
            row_description: self.row_description.to_vec(),
            masks: self.mask_ids().collect(),
            shape: self.shape.clone(),
            catalog_generation: self.catalog_generation,
            ddl_pending: self.ddl_pending,
            system_names: self.system_names,
        }
    }
}

struct PortalMask {
    applies: Applies,
    plan: Option<Arc<ResultPlan>>,
}

pub struct ResultMasking {
    shared: Arc<PgShared>,
    /// The transcript of what the client receives.
    rec: super::record::Recorder,
    catalog: Arc<Catalog>,
    /// Statements of the current simple query that have completed.
    query_index: usize,
    query_rows: Option<Arc<ResultPlan>>,
    copy: Option<CopyMasker>,
    portals: HashMap<String, PortalMask>,
    /// DDL ran in a transaction not yet ended: forget the catalog again when it ends.
    ddl_pending: bool,
    /// Unqualified names of `pg_catalog`'s relations still name them in this session
    /// (see [`NoCatalog`]); kept current by the session.
    pub system_names: bool,
    scratch: Vec<u8>,
    last_plan: Option<(PlanKey, Arc<ResultPlan>)>,
}

impl ResultMasking {
    pub fn new(shared: Arc<PgShared>, session: i64, catalog: Arc<Catalog>) -> Self {
        Self {
            rec: super::record::Recorder::new(shared.store.clone(), session),
            shared,
            catalog,
            query_index: 0,
            query_rows: None,
            copy: None,
            portals: HashMap::new(),
            ddl_pending: false,
            system_names: true,
            scratch: Vec::new(),
            last_plan: None,
        }
    }

    /// The install's masker (keyed hashes), for what is masked outside results.
    pub fn masker(&self) -> &crate::masking::value::Masker {
        &self.shared.masker
    }

    /// What the catalog knows that this result needs; nothing when no column rule applies
    /// (detectors need no names) or the catalog cannot be reached (then every table column
    /// is undecidable). The resolver, and whether a plan made with it may be reused (not
    /// after a failed lookup, which may be transient).
    async fn resolver(
        &self,
        shape: &Shape,
        fields: &[Field],
        masks: &[Arc<MaskSpec>],
    ) -> (Arc<dyn Resolve + Send + Sync>, bool) {
        let none = NoCatalog {
            unqualified: self.system_names,
        };
        if masks.iter().all(|m| m.columns.is_empty()) {
            return (Arc::new(none), true);
        }
        let cat = &self.catalog;
        // This session changed definitions in a transaction that has not ended: a
        // catalog connection of Portcullis's own still sees the old ones, which must not
        // be trusted (the session's own connection sees them).
        if self.ddl_pending && !cat.in_session() {
            return (Arc::new(none), true);
        }
        let (oids, names) = wanted(shape, fields);
        match cat.lookup(&self.shared, &oids, &names).await {
            // What the session's catalog was not asked about (it is asked before the
            // statement goes, between requests only) may still be one of PostgreSQL's
            // own relations, known without it.
            Ok(data) if cat.in_session() => (Arc::new(plan::Either(data, none)), true),
            Ok(data) => (data, true),
            Err(_) => (Arc::new(none), false),
        }
    }

    /// What a plan depends on: the same description, masks, statement shape and catalog
    /// state give the same plan. Taken before the plan is made (a catalog that changes
    /// meanwhile makes the kept plan's key stale, never a stale plan's key current).
    fn plan_inputs<'a>(&self, a: &'a Applies, body: &'a [u8]) -> PlanInputs<'a> {
        PlanInputs {
            row_description: body,
            masks: &a.masks,
            shape: a.shape(),
            catalog_generation: self.catalog.generation(),
            ddl_pending: self.ddl_pending,
            system_names: self.system_names,
        }
    }

    /// Repeated statements reuse the last plan.
    async fn plan_rows(
        &mut self,
        a: &Applies,
        body: &[u8],
    ) -> Result<Arc<ResultPlan>, ResultError> {
        let inputs = self.plan_inputs(a, body);
        if let Some((k, p)) = &self.last_plan
            && inputs.are(k)
        {
            return Ok(p.clone());
        }
        let (p, cacheable) = self.make_plan(a, body).await?;
        if cacheable {
            self.last_plan = Some((inputs.key(), p.clone()));
        }
        Ok(p)
    }

    async fn make_plan(
        &self,
        a: &Applies,
        body: &[u8],
    ) -> Result<(Arc<ResultPlan>, bool), ResultError> {
        let fields: Vec<Field> = messages::row_description(body)
            .map_err(|e| ResultError::Malformed(e.to_string()))?
            .into_iter()
            .map(|f| Field {
                name: f.name,
                table_oid: f.table_oid,
                attnum: f.column,
                type_oid: f.type_oid,
                format: f.format,
            })
            .collect();
        let (r, cacheable) = self.resolver(a.shape(), &fields, &a.masks).await;
        let (types, learned) = self.types(&fields).await;
        let p = plan::plan_rows(&a.masks, a.shape(), &fields, &*r, types)?;
        tracing::debug!(
            masked = p.columns.iter().filter(|c| c.whole.is_some()).count(),
            detectors = p.detection.is_some(),
            "result masking planned"
        );
        Ok((Arc::new(p), cacheable && learned))
    }

    /// What the catalog knows about the database's own types among the result's (how
    /// their values are read and masked), and whether a plan made with it may be reused
    /// (not after a failed lookup). Without any of them nothing is asked.
    async fn types(&self, fields: &[Field]) -> (Arc<Types>, bool) {
        let own: Vec<u32> = fields
            .iter()
            .map(|f| f.type_oid)
            .filter(|t| learnable(*t))
            .collect();
        if own.is_empty() {
            return (Arc::default(), true);
        }
        match self.catalog.learn_types(&self.shared, &own).await {
            Ok(types) => (types, true),
            Err(_) => (Arc::default(), false),
        }
    }

    async fn plan_copy(&self, a: &Applies, body: &[u8]) -> Result<CopyMasker, ResultError> {
        let (overall, cols) =
            messages::copy_response(body).map_err(|e| ResultError::Malformed(e.to_string()))?;
        if overall != 0 {
            return Err(Refusal::BinaryCopy {
                rule: a.masks[0].rule.clone(),
            }
            .into());
        }
        let (r, _) = self.resolver(a.shape(), &[], &a.masks).await;
        let (p, format) = plan::plan_copy(&a.masks, a.shape(), cols.len(), &*r)?;
        let format = format.unwrap_or(crate::policy::sql::lineage::CopyFormat {
            csv: false,
            delimiter: '\t',
            null: "\\N".into(),
            quote: '"',
            escape: '"',
            header: false,
        });
        CopyMasker::new(p, format).map_err(|e| ResultError::Malformed(e.to_string()))
    }

    /// Whether the rows of a portal are masked.
    pub fn masks_portal(&self, name: &str) -> bool {
        self.portals.contains_key(name)
    }

    /// BindComplete: which statement the portal now holds.
    pub fn on_bound(&mut self, b: Bound, prepared: &Prepared<'_>) {
        match b.ctx.as_ref().and_then(|j| applies(j, b.at, prepared)) {
            Some(applies) => {
                self.portals.insert(
                    b.portal,
                    PortalMask {
                        applies,
                        plan: None,
                    },
                );
            }
            None => {
                self.portals.remove(&b.portal);
            }
        }
    }

    /// The description of a portal, asked for by the engine after Bind.
    pub async fn on_described_portal(
        &mut self,
        f: &Frame,
        portal: &str,
    ) -> Result<(), ResultError> {
        let Some(mut pm) = self.portals.remove(portal) else {
            return Ok(());
        };
        pm.plan = if f.tag == be::ROW_DESCRIPTION {
            Some(self.plan_rows(&pm.applies, &f.body).await?)
        } else {
            None
        };
        self.portals.insert(portal.to_owned(), pm);
        Ok(())
    }

    pub fn on_ready(&mut self, status: u8) {
        self.query_index = 0;
        self.query_rows = None;
        self.copy = None;
        if status == b'I' && self.ddl_pending {
            self.ddl_pending = false;
            self.catalog.invalidate();
        }
    }

    /// DDL changes what names mean: forget the catalog now, distrust it for this session
    /// until the transaction ends (the catalog connection sees only committed changes),
    /// and forget it again then. DO blocks and procedures may run DDL too.
    fn on_complete(&mut self, body: &[u8]) {
        let tag = messages::command_tag(body).unwrap_or_default();
        let first = tag.split(' ').next().unwrap_or_default();
        if matches!(first, "CREATE" | "ALTER" | "DROP" | "DO" | "CALL") {
            self.catalog.invalidate();
            self.ddl_pending = true;
        }
    }

    /// A message of a result: rewritten into `out` as the plan says.
    pub async fn on_result(
        &mut self,
        f: Frame,
        owner: &Owner,
        head: Option<&Ctx>,
        prepared: &Prepared<'_>,
        out: &mut BytesMut,
    ) -> Result<(), ResultError> {
        match (owner, f.tag) {
            (Owner::Query, be::ROW_DESCRIPTION) => {
                self.query_rows = match head.and_then(|j| applies(j, self.query_index, prepared)) {
                    Some(a) => Some(self.plan_rows(&a, &f.body).await?),
                    None => None,
                };
            }
            (Owner::Query, be::DATA_ROW) => {
                if let Some(p) = self.query_rows.clone() {
                    return self.row(&p, &f, out);
                }
            }
            (Owner::Portal(name), be::DATA_ROW) => {
                if let Some(pm) = self.portals.get(name) {
                    let Some(p) = pm.plan.clone() else {
                        return Err(ResultError::Malformed(format!(
                            "rows for portal {name:?}, which was described as returning none"
                        )));
                    };
                    return self.row(&p, &f, out);
                }
            }
            (Owner::Query, be::COPY_OUT_RESPONSE) => {
                if let Some(a) = head.and_then(|j| applies(j, self.query_index, prepared)) {
                    self.copy = Some(self.plan_copy(&a, &f.body).await?);
                }
            }
            (Owner::Portal(name), be::COPY_OUT_RESPONSE) => {
                if let Some(pm) = self.portals.get(name) {
                    self.copy = Some(self.plan_copy(&pm.applies, &f.body).await?);
                }
            }
            (_, be::COPY_DATA) => {
                if let Some(c) = &mut self.copy {
                    c.feed(&self.shared.masker, &f.body, &mut self.scratch)
                        .map_err(|e| ResultError::Malformed(e.to_string()))?;
                    if !self.scratch.is_empty() {
                        put_frame(out, be::COPY_DATA, &self.scratch);
                        self.rec.observe(be::COPY_DATA, &self.scratch);
                    }
                    return Ok(());
                }
            }
            (_, be::COPY_DONE) => {
                if let Some(c) = self.copy.take() {
                    c.finish()
                        .map_err(|e| ResultError::Malformed(e.to_string()))?;
                }
            }
            (Owner::Query, be::COMMAND_COMPLETE | be::EMPTY_QUERY) => {
                if f.tag == be::COMMAND_COMPLETE {
                    self.on_complete(&f.body);
                }
                self.query_rows = None;
                self.query_index += 1;
            }
            (Owner::Portal(_), be::COMMAND_COMPLETE) => self.on_complete(&f.body),
            _ => {}
        }
        self.rec.observe(f.tag, &f.body);
        f.encode(out);
        Ok(())
    }

    /// A message the client receives that is not part of a result (errors, notices).
    pub fn observe(&mut self, f: &Frame) {
        self.rec.observe(f.tag, &f.body);
    }

    fn row(&mut self, p: &ResultPlan, f: &Frame, out: &mut BytesMut) -> Result<(), ResultError> {
        if !p.is_active() {
            self.rec.observe(f.tag, &f.body);
            f.encode(out);
            return Ok(());
        }
        mask_data_row(p, &self.shared.masker, &f.body, &mut self.scratch)
            .map_err(|e| ResultError::Malformed(e.to_string()))?;
        put_frame(out, be::DATA_ROW, &self.scratch);
        self.rec.observe(be::DATA_ROW, &self.scratch);
        Ok(())
    }
}

fn put_frame(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.reserve(5 + body.len());
    out.put_u8(tag);
    out.put_i32((body.len() + 4) as i32);
    out.extend_from_slice(body);
}
