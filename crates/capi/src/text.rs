//! C strings in and out: borrowing a caller's NUL-terminated UTF-8 text, reading it as JSON, and
//! handing back text the caller owns until it passes it to `dt_free`.
//!
//! Every string this library returns through a `char **` comes from [`give`] (a `CString` turned
//! into a raw pointer), so `dt_free` can take it back; nothing here uses the C allocator, and a
//! caller must never pass such a string to `free()`.

use std::ffi::{c_char, CStr, CString};

use devtables_schema::Item;
use serde_json::Value;

use crate::error::CapiError;

/// The caller's string `ptr` (argument `name`), borrowed for the call.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string that stays valid and unchanged during the
/// call.
pub(crate) unsafe fn borrow<'a>(
    ptr: *const c_char,
    name: &'static str,
) -> Result<&'a str, CapiError> {
    if ptr.is_null() {
        return Err(CapiError::Null(name));
    }
    // SAFETY: non-NULL, and the caller promises a NUL-terminated string.
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|source| CapiError::NotUtf8 { name, source })
}

/// Like [`borrow`], but NULL is `None`.
///
/// # Safety
/// As for [`borrow`].
pub(crate) unsafe fn borrow_opt<'a>(
    ptr: *const c_char,
    name: &'static str,
) -> Result<Option<&'a str>, CapiError> {
    if ptr.is_null() {
        Ok(None)
    } else {
        // SAFETY: as the caller promised.
        unsafe { borrow(ptr, name) }.map(Some)
    }
}

/// The JSON text `ptr` (argument `name`).
///
/// # Safety
/// As for [`borrow`].
pub(crate) unsafe fn json(ptr: *const c_char, name: &'static str) -> Result<Value, CapiError> {
    // SAFETY: as the caller promised.
    let text = unsafe { borrow(ptr, name) }?;
    serde_json::from_str(text).map_err(|source| CapiError::Json { name, source })
}

/// The JSON object `ptr` (argument `name`); NULL is the empty object when `null_is_empty`.
///
/// # Safety
/// As for [`borrow`].
pub(crate) unsafe fn object(
    ptr: *const c_char,
    name: &'static str,
    null_is_empty: bool,
) -> Result<Item, CapiError> {
    if ptr.is_null() && null_is_empty {
        return Ok(Item::new());
    }
    // SAFETY: as the caller promised.
    match unsafe { json(ptr, name) }? {
        Value::Object(map) => Ok(map),
        _ => Err(CapiError::Shape {
            name,
            expected: "a JSON object",
        }),
    }
}

/// `value` as JSON text the caller owns (free it with `dt_free`).
pub(crate) fn give(value: &impl serde::Serialize) -> *mut c_char {
    let text = serde_json::to_string(value).unwrap_or_else(|_| "null".to_string());
    give_text(text)
}

/// `text` as a C string the caller owns (free it with `dt_free`).
pub(crate) fn give_text(text: String) -> *mut c_char {
    // JSON text escapes NUL, so this holds for everything [`give`] makes; other text loses its
    // NULs rather than its tail.
    CString::new(text)
        .unwrap_or_else(|e| {
            let mut bytes = e.into_vec();
            bytes.retain(|b| *b != 0);
            CString::new(bytes).unwrap_or_default()
        })
        .into_raw()
}

/// Stores `value` at `out` when the caller asked for it (`out` not NULL); otherwise nothing is
/// allocated.
///
/// # Safety
/// `out` is NULL or points to writable storage for one pointer.
pub(crate) unsafe fn put(out: *mut *mut c_char, value: &impl serde::Serialize) {
    if !out.is_null() {
        // SAFETY: non-NULL and writable, as the caller promised.
        unsafe { *out = give(value) };
    }
}

/// Sets `*out` to NULL when `out` is not NULL, so a failed call leaves no stale pointer behind.
///
/// # Safety
/// As for [`put`].
pub(crate) unsafe fn clear(out: *mut *mut c_char) {
    if !out.is_null() {
        // SAFETY: as the caller promised.
        unsafe { *out = std::ptr::null_mut() };
    }
}

/// Takes back a string [`give`] made.
///
/// # Safety
/// `ptr` is NULL or a pointer [`give`] or [`give_text`] returned, not freed yet.
pub(crate) unsafe fn take_back(ptr: *mut c_char) {
    if !ptr.is_null() {
        // SAFETY: the caller promised it came from `CString::into_raw`.
        drop(unsafe { CString::from_raw(ptr) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_with_a_nul_loses_the_nul_not_its_tail() {
        let ptr = give_text("a\0b".to_string());
        // SAFETY: just made by give_text.
        let back = unsafe { CStr::from_ptr(ptr) }.to_str().unwrap().to_string();
        unsafe { take_back(ptr) };
        assert_eq!(back, "ab");
    }

    #[test]
    fn an_array_is_not_an_object() {
        let text = CString::new("[1]").unwrap();
        let err = unsafe { object(text.as_ptr(), "item_json", false) }.unwrap_err();
        assert_eq!(err.to_string(), "argument item_json must be a JSON object");
        let empty = unsafe { object(std::ptr::null(), "props_json", true) }.unwrap();
        assert!(empty.is_empty());
        assert!(matches!(
            unsafe { object(std::ptr::null(), "item_json", false) },
            Err(CapiError::Null("item_json"))
        ));
    }
}
