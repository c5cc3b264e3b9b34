//! `carmine image create|list|rm`: manages block images over Carmine's own wire protocol, with
//! ordinary object ops (a header object, the directory object, data objects).
//!
//! The directory is rewritten whole (read, change, WriteFull): two tools creating images at
//! the same instant can lose one name from the listing (the image itself stays). One operator
//! tool at a time is the supported use, as with most block-image managers without a lock
//! service.

use std::net::TcpStream;

use carmine_dataplane::wire::{Opcode, Status, SubOpCode, SubOpSpec};

use crate::client::{self, OwnedReply};
use crate::nbd::image::{self, ImageHeader, Oid};
use crate::units::parse_size;

#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Create an image: its header object and a directory entry (data objects appear as written).
    Create {
        name: String,
        /// Image size (e.g. 10GiB).
        #[arg(long)]
        size: String,
        /// Size of each data object, a power of two from 64KiB to 1GiB.
        #[arg(long, default_value = "4MiB")]
        object_size: String,
        #[arg(long, default_value = "127.0.0.1:6800")]
        target: String,
    },
    /// List images: name, size, object size.
    List {
        #[arg(long, default_value = "127.0.0.1:6800")]
        target: String,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image and all its data objects.
    Rm {
        name: String,
        #[arg(long, default_value = "127.0.0.1:6800")]
        target: String,
    },
}

pub fn run(command: &ImageCommand) -> Result<(), String> {
    match command {
        ImageCommand::Create {
            name,
            size,
            object_size,
            target,
        } => {
            let header = ImageHeader {
                size: parse_size(size).map_err(|e| format!("--size: {e}"))?,
                object_size: parse_size(object_size).map_err(|e| format!("--object-size: {e}"))?,
            };
            create(target, name, header)
        }
        ImageCommand::List { target, json } => list(target, *json),
        ImageCommand::Rm { name, target } => remove(target, name),
    }
}

/// One op; the op's status must be Ok (per-sub-op statuses are the caller's to read).
fn call(stream: &mut TcpStream, oid: &[u8], ops: &[SubOpSpec<'_>]) -> Result<OwnedReply, String> {
    let reply = client::call(stream, Opcode::OsdOp, oid, ops)?;
    let not_found = reply.status == Status::NotFound as u32;
    if reply.status != Status::Ok as u32 && !not_found {
        return Err(format!(
            "{}: server answered {}",
            String::from_utf8_lossy(oid),
            reply.status_name()
        ));
    }
    Ok(reply)
}

/// A whole small object, or None when it does not exist.
fn read_object(
    stream: &mut TcpStream,
    oid: &[u8],
    length: usize,
) -> Result<Option<Vec<u8>>, String> {
    let reply = call(stream, oid, &[SubOpSpec::read(0, length as u64)])?;
    match reply.results.first() {
        Some((status, _)) if *status == Status::NotFound as u32 => Ok(None),
        Some((0, data)) => Ok(Some(data.clone())),
        Some((status, _)) => Err(format!(
            "reading {}: {}",
            String::from_utf8_lossy(oid),
            client::status_name(*status)
        )),
        None => Err("reply without a result".into()),
    }
}

fn write_full(stream: &mut TcpStream, oid: &[u8], data: &[u8]) -> Result<(), String> {
    let op = SubOpSpec {
        code: SubOpCode::WriteFull,
        name: b"",
        data,
        offset: 0,
        length: 0,
    };
    let reply = call(stream, oid, &[op])?;
    if reply.status != Status::Ok as u32 {
        return Err(format!(
            "writing {}: {}",
            String::from_utf8_lossy(oid),
            reply.status_name()
        ));
    }
    Ok(())
}

/// Removes an object; a missing one is fine.
fn remove_object(stream: &mut TcpStream, oid: &[u8]) -> Result<(), String> {
    call(stream, oid, &[SubOpSpec::simple(SubOpCode::Remove)]).map(|_| ())
}

fn directory(stream: &mut TcpStream) -> Result<Vec<Vec<u8>>, String> {
    let bytes = read_object(stream, image::DIRECTORY_OID, image::DIRECTORY_BYTES_MAX)?;
    Ok(bytes.map_or_else(Vec::new, |b| {
        image::directory_names(&b).map(|n| n.to_vec()).collect()
    }))
}

fn write_directory(stream: &mut TcpStream, names: &[Vec<u8>]) -> Result<(), String> {
    let bytes = image::directory_bytes(names.iter().map(|n| n.as_slice()));
    if bytes.len() > image::DIRECTORY_BYTES_MAX {
        return Err(format!(
            "the image directory is full ({} bytes of names)",
            image::DIRECTORY_BYTES_MAX
        ));
    }
    write_full(stream, image::DIRECTORY_OID, &bytes)
}

fn read_header(stream: &mut TcpStream, name: &str) -> Result<Option<ImageHeader>, String> {
    let oid = Oid::header(name.as_bytes());
    match read_object(stream, oid.as_bytes(), image::HEADER_BYTES)? {
        None => Ok(None),
        Some(bytes) => ImageHeader::parse(&bytes)
            .map(Some)
            .map_err(|e| format!("image {name}: {e}")),
    }
}

fn create(target: &str, name: &str, header: ImageHeader) -> Result<(), String> {
    image::check_name(name.as_bytes())?;
    header.validate()?;
    let mut stream = client::connect(target)?;
    let mut names = directory(&mut stream)?;
    if names.iter().any(|n| n == name.as_bytes()) || read_header(&mut stream, name)?.is_some() {
        return Err(format!("image {name} already exists"));
    }
    let oid = Oid::header(name.as_bytes());
    write_full(&mut stream, oid.as_bytes(), &header.encode())?;
    names.push(name.as_bytes().to_vec());
    write_directory(&mut stream, &names)?;
    println!(
        "created image {name}: {} in {} objects of {}",
        image::human_size(header.size),
        header.object_count(),
        image::human_size(header.object_size)
    );
    Ok(())
}

fn list(target: &str, json: bool) -> Result<(), String> {
    let mut stream = client::connect(target)?;
    let mut rows = Vec::new();
    for name in directory(&mut stream)? {
        let name = String::from_utf8_lossy(&name).into_owned();
        match read_header(&mut stream, &name)? {
            Some(header) => rows.push((name, header)),
            None => log::warn!("image {name} is listed but has no header object"),
        }
    }
    if json {
        let images: Vec<serde_json::Value> = rows
            .iter()
            .map(|(name, h)| {
                serde_json::json!({"name": name, "size": h.size, "object_size": h.object_size})
            })
            .collect();
        println!("{}", serde_json::json!({ "images": images }));
        return Ok(());
    }
    println!("{:<24} {:>12} {:>12}", "name", "size", "object_size");
    for (name, header) in rows {
        println!(
            "{name:<24} {:>12} {:>12}",
            image::human_size(header.size),
            image::human_size(header.object_size)
        );
    }
    Ok(())
}

fn remove(target: &str, name: &str) -> Result<(), String> {
    image::check_name(name.as_bytes())?;
    let mut stream = client::connect(target)?;
    let Some(header) = read_header(&mut stream, name)? else {
        return Err(format!("image {name} does not exist"));
    };
    // The directory entry goes first: a removal cut short leaves unlisted objects, never a
    // listed image with missing data.
    let names: Vec<Vec<u8>> = directory(&mut stream)?
        .into_iter()
        .filter(|n| n != name.as_bytes())
        .collect();
    write_directory(&mut stream, &names)?;
    for index in 0..header.object_count() {
        remove_object(&mut stream, Oid::data(name.as_bytes(), index).as_bytes())?;
    }
    remove_object(&mut stream, Oid::header(name.as_bytes()).as_bytes())?;
    println!("removed image {name}");
    Ok(())
}
