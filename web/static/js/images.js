// Result images: the URLs as the gateway gives them (signed URLs work in a plain <img src>); when a plain
// load fails (an unsigned URL needs the Authorization header) the bytes are fetched with it instead.
// A click opens the lightbox, with a download link.

import { API_BASE, authHeaders } from "./api.js";
import { $, el } from "./dom.js";

const viaHeader = new Map(); // absolute url -> Promise<blob: url>

function fetchWithHeader(abs) {
  if (!viaHeader.has(abs)) {
    const p = fetch(abs, { headers: authHeaders() }).then(async (res) => {
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      return URL.createObjectURL(await res.blob());
    });
    p.catch(() => viaHeader.delete(abs)); // a later render may retry
    viaHeader.set(abs, p);
  }
  return viaHeader.get(abs);
}

// A thumbnail for image `n` of a task: <a class="shot"><img class="result"></a>, opening the lightbox.
export function resultImage(url, n, taskTitle) {
  const abs = new URL(url, API_BASE + "/").href;
  const name = `${taskTitle.replace(/[^\w-]+/g, "_").slice(0, 40) || "image"}_${n + 1}.png`;
  const img = el("img", { class: "result", alt: `result ${n + 1}`, loading: "lazy", decoding: "async" });
  const link = el("a", { class: "shot", href: abs, title: "Open full size" }, img);
  const use = (src) => { img.src = src; link.href = src; link.dataset.src = src; };
  img.addEventListener("error", async () => {
    if (img.dataset.fallback) { link.classList.add("broken"); img.alt = "image not available"; return; }
    img.dataset.fallback = "1";
    try { use(await fetchWithHeader(abs)); } catch (err) { link.classList.add("broken"); img.alt = `image not available (${err.message})`; }
  });
  link.addEventListener("click", (event) => {
    event.preventDefault();
    openLightbox(link.dataset.src || abs, name);
  });
  use(abs);
  return link;
}

export function openLightbox(src, name) {
  const box = $("lightbox");
  $("lightboxImg").src = src;
  $("lightboxDownload").href = src;
  $("lightboxDownload").setAttribute("download", name);
  $("lightboxOpen").href = src;
  if (!box.open) box.showModal();
}

export function bindLightbox() {
  const box = $("lightbox");
  $("lightboxClose").addEventListener("click", () => box.close());
  box.addEventListener("click", (event) => { if (event.target === box) box.close(); }); // the backdrop
}
