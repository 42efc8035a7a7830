//! libnftnl's text form of nf_tables objects, parsed from netlink messages (ours or the
//! kernel's). The golden tests compare it with `nft --debug=netlink`; audit compares desired and
//! actual rules on it.

use std::ffi::{c_char, CStr};
use std::ptr::NonNull;

use nftnl::nftnl_sys as sys;

/// Copies a message into 4-byte aligned storage (`nlmsghdr` alignment) and calls `f` on it.
fn with_aligned<R>(msg: &[u8], f: impl FnOnce(*const libc::nlmsghdr) -> R) -> R {
    // One zero word more than needed: a C string read can never run off the copy.
    let mut words = vec![0u32; msg.len().div_ceil(4) + 1];
    for (w, chunk) in words.iter_mut().zip(msg.chunks(4)) {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u32::from_ne_bytes(b);
    }
    f(words.as_ptr() as *const libc::nlmsghdr)
}

fn c_string(buf: &[u8]) -> String {
    CStr::from_bytes_until_nul(buf)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A rule as text: its chain, one line per expression and its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleText {
    pub chain: String,
    pub handle: u64,
    /// `[ meta load mark => reg 1 ]`, ...; counter values are left out (`[ counter ]`).
    pub exprs: Vec<String>,
    pub comment: Option<String>,
    /// The packets its counter counted (0 without a counter); never compared.
    pub packets: u64,
}

impl RuleText {
    /// Expressions joined on one line, for messages.
    pub fn exprs_line(&self) -> String {
        self.exprs.join(" ")
    }
}

/// A parsed libnftnl rule, freed on drop.
struct RawRule(NonNull<sys::nftnl_rule>);

impl RawRule {
    fn parse(msg: &[u8]) -> Option<RawRule> {
        // libnftnl exits the process on some malformed attributes: check them first.
        if !super::abi::rule_is_safe_for_libnftnl(msg) {
            return None;
        }
        // SAFETY: plain allocation, checked for NULL.
        let r = NonNull::new(unsafe { sys::nftnl_rule_alloc() })?;
        let rule = RawRule(r);
        // SAFETY: `nlh` points at a complete, aligned copy of the message for the call's
        // duration; libnftnl copies what it keeps.
        let rc = with_aligned(msg, |nlh| unsafe {
            sys::nftnl_rule_nlmsg_parse(nlh, r.as_ptr())
        });
        (rc >= 0).then_some(rule)
    }
}

impl Drop for RawRule {
    fn drop(&mut self) {
        // SAFETY: allocated by nftnl_rule_alloc, freed once.
        unsafe { sys::nftnl_rule_free(self.0.as_ptr()) };
    }
}

/// libnftnl's full debug print of a NEWRULE message, exactly what `nft --debug=netlink` prints
/// (the golden files of `encode_tests`).
#[cfg(test)]
pub fn rule_debug(msg: &[u8]) -> Option<String> {
    let r = RawRule::parse(msg)?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: `buf` is writable for its length; snprintf NUL-terminates within it.
    unsafe {
        sys::nftnl_rule_snprintf(
            buf.as_mut_ptr() as *mut c_char,
            buf.len(),
            r.0.as_ptr(),
            sys::NFTNL_OUTPUT_DEFAULT,
            0,
        )
    };
    Some(c_string(&buf))
}

/// The comparable text of a NEWRULE message.
pub fn rule_text(msg: &[u8]) -> Option<RuleText> {
    let r = RawRule::parse(msg)?;
    let p = r.0.as_ptr();
    // SAFETY: `p` is a live rule; the getters return pointers into it (or NULL when unset),
    // which are copied before the rule is freed.
    let (chain, handle, comment) = unsafe {
        let c = sys::nftnl_rule_get_str(p, sys::NFTNL_RULE_CHAIN as u16);
        let chain = if c.is_null() {
            String::new()
        } else {
            CStr::from_ptr(c).to_string_lossy().into_owned()
        };
        let handle = sys::nftnl_rule_get_u64(p, sys::NFTNL_RULE_HANDLE as u16);
        let mut len = 0u32;
        let ud = sys::nftnl_rule_get_data(p, sys::NFTNL_RULE_USERDATA as u16, &mut len);
        let comment = if ud.is_null() {
            None
        } else {
            comment_from_udata(std::slice::from_raw_parts(ud as *const u8, len as usize))
        };
        (chain, handle, comment)
    };
    let mut exprs = Vec::new();
    let mut packets = 0;
    // SAFETY: the iterator borrows the live rule and is destroyed before it; each expression
    // pointer is only used within the loop iteration.
    unsafe {
        let it = sys::nftnl_expr_iter_create(p);
        if !it.is_null() {
            let mut e = sys::nftnl_expr_iter_next(it);
            while !e.is_null() {
                let text = expr_text(e);
                if text == "[ counter ]" {
                    packets = sys::nftnl_expr_get_u64(e, sys::NFTNL_EXPR_CTR_PACKETS as u16);
                }
                exprs.push(text);
                e = sys::nftnl_expr_iter_next(it);
            }
            sys::nftnl_expr_iter_destroy(it);
        }
    }
    Some(RuleText {
        chain,
        handle,
        exprs,
        comment,
        packets,
    })
}

/// `[ NAME BODY ]` as libnftnl prints one expression, normalised: counter values dropped, zero
/// lookup flags dropped, a dynset's zero timeout dropped, and redir's `proto_max` dropped when it repeats `proto_min` (the kernel
/// fills both in).
///
/// # Safety
/// `e` must be a live expression.
unsafe fn expr_text(e: *mut sys::nftnl_expr) -> String {
    // SAFETY: per the contract; the name pointer lives as long as the expression.
    let name = unsafe {
        let n = sys::nftnl_expr_get_str(e, sys::NFTNL_EXPR_NAME as u16);
        if n.is_null() {
            String::from("?")
        } else {
            CStr::from_ptr(n).to_string_lossy().into_owned()
        }
    };
    if name == "counter" {
        return "[ counter ]".to_string();
    }
    let mut buf = [0u8; 1024];
    // SAFETY: `buf` is writable for its length; snprintf NUL-terminates within it.
    unsafe {
        sys::nftnl_expr_snprintf(
            buf.as_mut_ptr() as *mut c_char,
            buf.len(),
            e,
            sys::NFTNL_OUTPUT_DEFAULT,
            0,
        )
    };
    let mut body = c_string(&buf).trim().to_string();
    // The kernel dumps lookup flags even when zero; libnftnl then prints them ("0x0").
    if name == "lookup" {
        if let Some(b) = body.strip_suffix(" 0x0") {
            body = b.to_string();
        }
    }
    // The kernel dumps a dynset's timeout even when none was set (the set's own applies).
    if name == "dynset" {
        body = body.replace(" timeout 0ms", "");
    }
    if name == "redir" {
        if let (Some(min), Some(max)) = (
            field(&body, "proto_min reg "),
            field(&body, "proto_max reg "),
        ) {
            if min == max {
                body = body.replace(&format!("proto_max reg {max} "), "");
            }
        }
    }
    format!("[ {name} {body} ]")
}

fn field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    let i = body.find(key)? + key.len();
    body[i..].split_whitespace().next()
}

/// The comment in a rule's userdata TLVs (type 0, NUL-terminated).
pub fn comment_from_udata(ud: &[u8]) -> Option<String> {
    let mut rest = ud;
    while rest.len() >= 2 {
        let (ty, len) = (rest[0], rest[1] as usize);
        let value = rest.get(2..2 + len)?;
        if ty == sys::NFTNL_UDATA_RULE_COMMENT as u8 {
            return Some(c_string(value));
        }
        rest = &rest[2 + len..];
    }
    None
}
