//! The Vulkan context: the loader (loaded at run time, so a machine without one gets an
//! error, not a missing-symbol crash), the chosen physical device and its features, one
//! compute queue, device buffers with a byte budget, compute pipelines from the build's
//! SPIR-V, and a recorder that turns a list of dispatches into one submitted command buffer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ash::vk;

/// Seconds a submission may take before the backend reports the GPU as hung.
const FENCE_TIMEOUT_S: u64 = 600;

pub struct DeviceInfo {
    pub name: String,
    pub kind: String,
    pub api: String,
    pub subgroup_size: u32,
    pub subgroup_arith: bool,
    pub float16: bool,
    pub int8_dot: bool,
    pub device_local_bytes: u64,
    pub max_range: u64,
    pub max_groups: [u32; 3],
    pub offset_align: u64,
    /// Nanoseconds per timestamp tick.
    pub timestamp_ns: f64,
}

pub struct Ctx {
    _entry: ash::Entry,
    instance: ash::Instance,
    pub pd: vk::PhysicalDevice,
    pub dev: ash::Device,
    queue: vk::Queue,
    cmd_pool: vk::CommandPool,
    fence: vk::Fence,
    mem_props: vk::PhysicalDeviceMemoryProperties,
    pub info: DeviceInfo,
    /// Bytes of device memory this backend holds, and its cap.
    used: AtomicU64,
    pub budget: u64,
    /// With `COORDGEN_VULKAN_PROFILE=1`: per shader, (dispatches, GPU nanoseconds), from
    /// timestamps around every dispatch; printed when the backend is dropped.
    pub profile: Option<Mutex<BTreeMap<String, (u64, f64)>>>,
}

fn vkerr(what: &str) -> impl Fn(vk::Result) -> String + '_ {
    move |e| format!("vulkan: {what} failed: {e}")
}

/// Names of the devices the loader reports, for error messages and `coordgen plugins`.
fn device_list(instance: &ash::Instance, pds: &[vk::PhysicalDevice]) -> String {
    pds.iter()
        .enumerate()
        .map(|(i, &pd)| {
            let p = unsafe { instance.get_physical_device_properties(pd) };
            format!("{i}: {}", p.device_name_as_c_str().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Ctx {
    /// Opens device `index` (`None`: the first discrete or integrated GPU, else device 0).
    /// `budget` caps the device memory the backend may allocate (0: the device-local heap).
    pub fn new(index: Option<usize>, budget: u64) -> Result<Arc<Ctx>, String> {
        let entry = unsafe { ash::Entry::load() }.map_err(|e| {
            format!("vulkan: no Vulkan loader ({e}); install libvulkan1 and a driver (mesa-vulkan-drivers for the software one), or use target_backend = \"cpu\"")
        })?;
        let app = vk::ApplicationInfo::default().application_name(c"coordgen").api_version(vk::API_VERSION_1_2);
        let instance = unsafe { entry.create_instance(&vk::InstanceCreateInfo::default().application_info(&app), None) }
            .map_err(|e| format!("vulkan: creating an instance failed ({e}); is a Vulkan driver installed? Use target_backend = \"cpu\" to run without one"))?;
        let pds = unsafe { instance.enumerate_physical_devices() }.map_err(vkerr("listing devices"))?;
        if pds.is_empty() {
            unsafe { instance.destroy_instance(None) };
            return Err("vulkan: the loader reports no Vulkan device; use target_backend = \"cpu\"".into());
        }
        let pick = match index {
            Some(i) if i >= pds.len() => {
                let list = device_list(&instance, &pds);
                unsafe { instance.destroy_instance(None) };
                return Err(format!("vulkan: device {i} does not exist; the devices are {list}"));
            }
            Some(i) => i,
            None => pds
                .iter()
                .position(|&pd| {
                    let t = unsafe { instance.get_physical_device_properties(pd) }.device_type;
                    t == vk::PhysicalDeviceType::DISCRETE_GPU || t == vk::PhysicalDeviceType::INTEGRATED_GPU
                })
                .unwrap_or(0),
        };
        let pd = pds[pick];
        match Self::open(entry.clone(), instance.clone(), pd, budget) {
            Ok(c) => Ok(Arc::new(c)),
            Err(e) => {
                unsafe { instance.destroy_instance(None) };
                Err(e)
            }
        }
    }

    fn open(entry: ash::Entry, instance: ash::Instance, pd: vk::PhysicalDevice, budget: u64) -> Result<Ctx, String> {
        let props = unsafe { instance.get_physical_device_properties(pd) };
        let name = props.device_name_as_c_str().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        if vk::api_version_major(props.api_version) == 1 && vk::api_version_minor(props.api_version) < 1 {
            return Err(format!("vulkan: {name} supports Vulkan {}.{} only; the backend needs 1.1", 1, vk::api_version_minor(props.api_version)));
        }
        let mut sg = vk::PhysicalDeviceSubgroupProperties::default();
        let mut p2 = vk::PhysicalDeviceProperties2::default().push_next(&mut sg);
        unsafe { instance.get_physical_device_properties2(pd, &mut p2) };
        let mut f12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut f2 = vk::PhysicalDeviceFeatures2::default().push_next(&mut f12);
        unsafe { instance.get_physical_device_features2(pd, &mut f2) };
        let float16 = f12.shader_float16 == vk::TRUE;
        let subgroup_arith = sg.supported_stages.contains(vk::ShaderStageFlags::COMPUTE)
            && sg.supported_operations.contains(vk::SubgroupFeatureFlags::ARITHMETIC | vk::SubgroupFeatureFlags::BASIC);
        let mut dot = vk::PhysicalDeviceShaderIntegerDotProductProperties::default();
        let int8_dot = if props.api_version >= vk::API_VERSION_1_3 {
            let mut p3 = vk::PhysicalDeviceProperties2::default().push_next(&mut dot);
            unsafe { instance.get_physical_device_properties2(pd, &mut p3) };
            dot.integer_dot_product8_bit_signed_accelerated == vk::TRUE
        } else {
            false
        };
        let mem_props = unsafe { instance.get_physical_device_memory_properties(pd) };
        let device_local_bytes = mem_props.memory_heaps[..mem_props.memory_heap_count as usize]
            .iter()
            .filter(|h| h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL))
            .map(|h| h.size)
            .max()
            .unwrap_or(0);
        let qf = unsafe { instance.get_physical_device_queue_family_properties(pd) }
            .iter()
            .position(|q| q.queue_flags.contains(vk::QueueFlags::COMPUTE))
            .ok_or_else(|| format!("vulkan: {name} has no compute queue"))? as u32;
        let prio = [1.0f32];
        let qci = vk::DeviceQueueCreateInfo::default().queue_family_index(qf).queue_priorities(&prio);
        let dci = vk::DeviceCreateInfo::default().queue_create_infos(std::slice::from_ref(&qci));
        let dev = unsafe { instance.create_device(pd, &dci, None) }.map_err(vkerr("creating the device"))?;
        let queue = unsafe { dev.get_device_queue(qf, 0) };
        let cmd_pool = unsafe {
            dev.create_command_pool(
                &vk::CommandPoolCreateInfo::default().queue_family_index(qf).flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER),
                None,
            )
        }
        .map_err(vkerr("creating a command pool"))?;
        let fence = unsafe { dev.create_fence(&vk::FenceCreateInfo::default(), None) }.map_err(vkerr("creating a fence"))?;
        let l = &props.limits;
        let info = DeviceInfo {
            name,
            kind: format!("{:?}", props.device_type),
            api: format!("{}.{}.{}", vk::api_version_major(props.api_version), vk::api_version_minor(props.api_version), vk::api_version_patch(props.api_version)),
            subgroup_size: sg.subgroup_size,
            subgroup_arith,
            float16,
            int8_dot,
            device_local_bytes,
            // Keep one binding well under the limits of any device.
            max_range: (l.max_storage_buffer_range as u64).min(1 << 30),
            max_groups: l.max_compute_work_group_count,
            offset_align: l.min_storage_buffer_offset_alignment.max(4),
            timestamp_ns: l.timestamp_period as f64,
        };
        let profile = (std::env::var("COORDGEN_VULKAN_PROFILE").as_deref() == Ok("1") && l.timestamp_compute_and_graphics == vk::TRUE).then(|| Mutex::new(BTreeMap::new()));
        let budget = if budget == 0 { device_local_bytes } else { budget };
        Ok(Ctx { _entry: entry, instance, pd, dev, queue, cmd_pool, fence, mem_props, info, used: AtomicU64::new(0), budget, profile })
    }

    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn memory_type(&self, bits: u32, want: vk::MemoryPropertyFlags, prefer: vk::MemoryPropertyFlags) -> Option<u32> {
        let types = &self.mem_props.memory_types[..self.mem_props.memory_type_count as usize];
        let ok = |i: usize, f: vk::MemoryPropertyFlags| bits & (1 << i) != 0 && types[i].property_flags.contains(f);
        (0..types.len()).find(|&i| ok(i, want | prefer)).or_else(|| (0..types.len()).find(|&i| ok(i, want))).map(|i| i as u32)
    }

    /// Submits `cb` and waits for it, with a time limit so a hung GPU is an error.
    pub fn submit_wait(&self, cb: vk::CommandBuffer) -> Result<(), String> {
        let cbs = [cb];
        let si = vk::SubmitInfo::default().command_buffers(&cbs);
        unsafe {
            self.dev.queue_submit(self.queue, &[si], self.fence).map_err(vkerr("submitting work"))?;
            let r = self.dev.wait_for_fences(&[self.fence], true, FENCE_TIMEOUT_S * 1_000_000_000);
            let _ = self.dev.reset_fences(&[self.fence]);
            match r {
                Ok(()) => Ok(()),
                Err(vk::Result::TIMEOUT) => Err(format!("vulkan: the GPU did not finish a forward in {FENCE_TIMEOUT_S} s")),
                Err(e) => Err(format!("vulkan: waiting for the GPU failed: {e} (device lost?)")),
            }
        }
    }

    pub fn alloc_cmd(&self) -> Result<vk::CommandBuffer, String> {
        let ai = vk::CommandBufferAllocateInfo::default().command_pool(self.cmd_pool).level(vk::CommandBufferLevel::PRIMARY).command_buffer_count(1);
        Ok(unsafe { self.dev.allocate_command_buffers(&ai) }.map_err(vkerr("allocating a command buffer"))?[0])
    }

    pub fn free_cmd(&self, cb: vk::CommandBuffer) {
        unsafe { self.dev.free_command_buffers(self.cmd_pool, &[cb]) };
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if let Some(p) = &self.profile {
            let p = p.lock().unwrap_or_else(|e| e.into_inner());
            let total: f64 = p.values().map(|v| v.1).sum();
            eprintln!("vulkan profile on {} (GPU time per shader):", self.info.name);
            let mut rows: Vec<_> = p.iter().collect();
            rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
            for (name, (n, ns)) in rows {
                eprintln!("  {name:<16} {n:>8} dispatches {:>10.1} ms {:>5.1}%", ns / 1e6, 100.0 * ns / total.max(1.0));
            }
        }
        unsafe {
            let _ = self.dev.device_wait_idle();
            self.dev.destroy_fence(self.fence, None);
            self.dev.destroy_command_pool(self.cmd_pool, None);
            self.dev.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}

/// Where a buffer lives: device memory for weights, KV and activations; host-visible
/// memory for the few bytes that cross per forward (inputs, logits).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mem {
    Device,
    Host,
}

pub struct Buffer {
    ctx: Arc<Ctx>,
    pub buf: vk::Buffer,
    mem: vk::DeviceMemory,
    pub size: u64,
    mapped: *mut u8,
}

// SAFETY: the mapped pointer is only touched by the one host thread that drives the backend
// (the interface calls every method from one thread at a time).
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}

impl Buffer {
    pub fn new(ctx: &Arc<Ctx>, size: u64, mem: Mem, what: &str) -> Result<Buffer, String> {
        let size = size.max(16).next_multiple_of(4);
        let used = ctx.used.load(Ordering::Relaxed);
        if used + size > ctx.budget {
            return Err(format!(
                "vulkan: too little device memory for {what}: {} MB more would exceed the {} MB budget ({} MB in use on {}); use a smaller model or context, raise memory_budget_mb, or use target_backend = \"cpu\"",
                size >> 20,
                ctx.budget >> 20,
                used >> 20,
                ctx.info.name
            ));
        }
        let d = &ctx.dev;
        let usage = vk::BufferUsageFlags::STORAGE_BUFFER | vk::BufferUsageFlags::TRANSFER_SRC | vk::BufferUsageFlags::TRANSFER_DST;
        let buf = unsafe { d.create_buffer(&vk::BufferCreateInfo::default().size(size).usage(usage), None) }.map_err(vkerr("creating a buffer"))?;
        let req = unsafe { d.get_buffer_memory_requirements(buf) };
        let (want, prefer) = match mem {
            Mem::Device => (vk::MemoryPropertyFlags::DEVICE_LOCAL, vk::MemoryPropertyFlags::empty()),
            Mem::Host => (vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT, vk::MemoryPropertyFlags::HOST_CACHED),
        };
        let Some(ti) = ctx.memory_type(req.memory_type_bits, want, prefer) else {
            unsafe { d.destroy_buffer(buf, None) };
            return Err(format!("vulkan: no memory type for {what}"));
        };
        let memory = match unsafe { d.allocate_memory(&vk::MemoryAllocateInfo::default().allocation_size(req.size).memory_type_index(ti), None) } {
            Ok(m) => m,
            Err(e) => {
                unsafe { d.destroy_buffer(buf, None) };
                return Err(format!("vulkan: allocating {} MB of device memory for {what} failed ({e}); use a smaller model or context, or target_backend = \"cpu\"", size >> 20));
            }
        };
        let host_visible = ctx.mem_props.memory_types[ti as usize].property_flags.contains(vk::MemoryPropertyFlags::HOST_VISIBLE);
        let mapped = unsafe {
            d.bind_buffer_memory(buf, memory, 0).map_err(vkerr("binding memory"))?;
            if host_visible {
                d.map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()).map_err(vkerr("mapping memory"))? as *mut u8
            } else {
                std::ptr::null_mut()
            }
        };
        ctx.used.fetch_add(size, Ordering::Relaxed);
        Ok(Buffer { ctx: ctx.clone(), buf, mem: memory, size, mapped })
    }

    /// Host view of a host-visible buffer.
    pub fn host(&self) -> Option<&mut [u8]> {
        (!self.mapped.is_null()).then(|| unsafe { std::slice::from_raw_parts_mut(self.mapped, self.size as usize) })
    }

    /// The whole buffer as a binding.
    pub fn all(&self) -> Bind {
        Bind { buf: self.buf, offset: 0, range: self.size }
    }

    pub fn range(&self, offset: u64, range: u64) -> Bind {
        Bind { buf: self.buf, offset, range }
    }

    /// Writes `bytes` at `offset`: directly where the memory is mapped, else through a
    /// staging buffer and a copy.
    pub fn write(&self, offset: u64, bytes: &[u8]) -> Result<(), String> {
        if let Some(h) = self.host() {
            h[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
            return Ok(());
        }
        const STAGE: usize = 32 << 20;
        let staging = Buffer::new(&self.ctx, bytes.len().min(STAGE) as u64, Mem::Host, "an upload staging buffer")?;
        for (i, part) in bytes.chunks(STAGE).enumerate() {
            staging.host().unwrap()[..part.len()].copy_from_slice(part);
            let mut r = Recorder::new(&self.ctx)?;
            r.copy(&staging, 0, self, offset + (i * STAGE) as u64, part.len() as u64);
            r.submit()?;
        }
        Ok(())
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        unsafe {
            self.ctx.dev.destroy_buffer(self.buf, None);
            self.ctx.dev.free_memory(self.mem, None);
        }
        self.ctx.used.fetch_sub(self.size, Ordering::Relaxed);
    }
}

/// A buffer range bound to one shader binding.
#[derive(Clone, Copy)]
pub struct Bind {
    pub buf: vk::Buffer,
    pub offset: u64,
    pub range: u64,
}

/// A compute pipeline with its own set layout of `n` storage buffers and push constants.
pub struct Pipeline {
    pub name: String,
    pub pipe: vk::Pipeline,
    pub layout: vk::PipelineLayout,
    pub set_layout: vk::DescriptorSetLayout,
    pub n_bindings: u32,
}

impl Pipeline {
    /// A compute pipeline; `spec[i]` sets the shader's `constant_id = i` (all 32-bit).
    pub fn new(ctx: &Ctx, name: &str, spv: &[u8], n_bindings: u32, push_bytes: u32, spec: &[u32]) -> Result<Pipeline, String> {
        let words = ash::util::read_spv(&mut std::io::Cursor::new(spv)).map_err(|e| format!("vulkan: shader {name}: {e}"))?;
        let d = &ctx.dev;
        let bindings: Vec<_> = (0..n_bindings)
            .map(|i| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(i)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            })
            .collect();
        unsafe {
            let module = d.create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&words), None).map_err(|e| format!("vulkan: shader {name} was refused by the driver: {e}"))?;
            let set_layout = d.create_descriptor_set_layout(&vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings), None).map_err(vkerr("creating a set layout"))?;
            let pcr = [vk::PushConstantRange::default().stage_flags(vk::ShaderStageFlags::COMPUTE).offset(0).size(push_bytes)];
            let sls = [set_layout];
            let layout = d.create_pipeline_layout(&vk::PipelineLayoutCreateInfo::default().set_layouts(&sls).push_constant_ranges(&pcr), None).map_err(vkerr("creating a pipeline layout"))?;
            let entries: Vec<vk::SpecializationMapEntry> = (0..spec.len() as u32).map(|i| vk::SpecializationMapEntry { constant_id: i, offset: 4 * i, size: 4 }).collect();
            let data: Vec<u8> = spec.iter().flat_map(|v| v.to_ne_bytes()).collect();
            let si = vk::SpecializationInfo::default().map_entries(&entries).data(&data);
            let mut stage = vk::PipelineShaderStageCreateInfo::default().stage(vk::ShaderStageFlags::COMPUTE).module(module).name(c"main");
            if !spec.is_empty() {
                stage = stage.specialization_info(&si);
            }
            let ci = vk::ComputePipelineCreateInfo::default().stage(stage).layout(layout);
            let r = d.create_compute_pipelines(vk::PipelineCache::null(), &[ci], None);
            d.destroy_shader_module(module, None);
            let pipe = r.map_err(|(_, e)| format!("vulkan: building the {name} shader failed: {e}"))?[0];
            Ok(Pipeline { name: name.to_string(), pipe, layout, set_layout, n_bindings })
        }
    }

    pub fn destroy(&self, ctx: &Ctx) {
        unsafe {
            ctx.dev.destroy_pipeline(self.pipe, None);
            ctx.dev.destroy_pipeline_layout(self.layout, None);
            ctx.dev.destroy_descriptor_set_layout(self.set_layout, None);
        }
    }
}

/// Records dispatches and copies into one command buffer, each followed by a full memory
/// barrier (the steps of a forward depend on each other in sequence), then submits it.
pub struct Recorder<'a> {
    ctx: &'a Arc<Ctx>,
    cb: vk::CommandBuffer,
    pools: Vec<vk::DescriptorPool>,
    left: u32,
    pub dispatches: usize,
    /// Profiling: the timestamp query pool and the shader name of each query pair.
    queries: Option<vk::QueryPool>,
    timed: Vec<String>,
}

const SETS_PER_POOL: u32 = 1024;
/// Dispatches a profiled command buffer times (the rest go untimed).
const MAX_TIMED: u32 = 8192;

impl<'a> Recorder<'a> {
    pub fn new(ctx: &'a Arc<Ctx>) -> Result<Recorder<'a>, String> {
        let cb = ctx.alloc_cmd()?;
        unsafe { ctx.dev.begin_command_buffer(cb, &vk::CommandBufferBeginInfo::default().flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT)) }
            .map_err(vkerr("recording"))?;
        let mut queries = None;
        if ctx.profile.is_some() {
            let qi = vk::QueryPoolCreateInfo::default().query_type(vk::QueryType::TIMESTAMP).query_count(2 * MAX_TIMED);
            let pool = unsafe { ctx.dev.create_query_pool(&qi, None) }.map_err(vkerr("creating a query pool"))?;
            unsafe { ctx.dev.cmd_reset_query_pool(cb, pool, 0, 2 * MAX_TIMED) };
            queries = Some(pool);
        }
        Ok(Recorder { ctx, cb, pools: Vec::new(), left: 0, dispatches: 0, queries, timed: Vec::new() })
    }

    fn set(&mut self, p: &Pipeline) -> Result<vk::DescriptorSet, String> {
        let d = &self.ctx.dev;
        if self.left == 0 {
            let sizes = [vk::DescriptorPoolSize { ty: vk::DescriptorType::STORAGE_BUFFER, descriptor_count: SETS_PER_POOL * 6 }];
            let pool = unsafe { d.create_descriptor_pool(&vk::DescriptorPoolCreateInfo::default().max_sets(SETS_PER_POOL).pool_sizes(&sizes), None) }
                .map_err(vkerr("creating a descriptor pool"))?;
            self.pools.push(pool);
            self.left = SETS_PER_POOL;
        }
        self.left -= 1;
        let layouts = [p.set_layout];
        let ai = vk::DescriptorSetAllocateInfo::default().descriptor_pool(*self.pools.last().unwrap()).set_layouts(&layouts);
        Ok(unsafe { d.allocate_descriptor_sets(&ai) }.map_err(vkerr("allocating a descriptor set"))?[0])
    }

    fn barrier(&self) {
        let all = vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::TRANSFER_READ | vk::AccessFlags::TRANSFER_WRITE;
        let mb = vk::MemoryBarrier::default().src_access_mask(all).dst_access_mask(all);
        let stages = vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER;
        unsafe { self.ctx.dev.cmd_pipeline_barrier(self.cb, stages, stages, vk::DependencyFlags::empty(), &[mb], &[], &[]) };
    }

    /// One dispatch of `p` over `groups` workgroups with these bindings and push constants.
    pub fn dispatch(&mut self, p: &Pipeline, binds: &[Bind], push: &[u32], groups: [u32; 3]) -> Result<(), String> {
        assert_eq!(binds.len() as u32, p.n_bindings, "{}: binding count", p.name);
        let mg = self.ctx.info.max_groups;
        if groups.iter().zip(mg).any(|(&g, m)| g > m) {
            return Err(format!("vulkan: {} needs {groups:?} workgroups, more than the device's {mg:?}", p.name));
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let set = self.set(p)?;
        let infos: Vec<vk::DescriptorBufferInfo> = binds.iter().map(|b| vk::DescriptorBufferInfo { buffer: b.buf, offset: b.offset, range: b.range }).collect();
        let writes: Vec<vk::WriteDescriptorSet> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                vk::WriteDescriptorSet::default().dst_set(set).dst_binding(i as u32).descriptor_type(vk::DescriptorType::STORAGE_BUFFER).buffer_info(std::slice::from_ref(info))
            })
            .collect();
        let d = &self.ctx.dev;
        unsafe {
            d.update_descriptor_sets(&writes, &[]);
            d.cmd_bind_pipeline(self.cb, vk::PipelineBindPoint::COMPUTE, p.pipe);
            d.cmd_bind_descriptor_sets(self.cb, vk::PipelineBindPoint::COMPUTE, p.layout, 0, &[set], &[]);
            let bytes = std::slice::from_raw_parts(push.as_ptr() as *const u8, push.len() * 4);
            d.cmd_push_constants(self.cb, p.layout, vk::ShaderStageFlags::COMPUTE, 0, bytes);
            let q = self.queries.filter(|_| self.timed.len() < MAX_TIMED as usize).map(|pool| (pool, 2 * self.timed.len() as u32));
            if let Some((pool, i)) = q {
                d.cmd_write_timestamp(self.cb, vk::PipelineStageFlags::TOP_OF_PIPE, pool, i);
            }
            d.cmd_dispatch(self.cb, groups[0], groups[1], groups[2]);
            if let Some((pool, i)) = q {
                d.cmd_write_timestamp(self.cb, vk::PipelineStageFlags::BOTTOM_OF_PIPE, pool, i + 1);
                self.timed.push(p.name.clone());
            }
        }
        self.dispatches += 1;
        self.barrier();
        Ok(())
    }

    pub fn copy(&mut self, src: &Buffer, src_off: u64, dst: &Buffer, dst_off: u64, len: u64) {
        self.copies(src, dst, &[(src_off, dst_off, len)]);
    }

    /// Copies regions `(src offset, dst offset, bytes)`; the sources and destinations of one
    /// call must not overlap each other.
    pub fn copies(&mut self, src: &Buffer, dst: &Buffer, regions: &[(u64, u64, u64)]) {
        let r: Vec<vk::BufferCopy> = regions.iter().filter(|x| x.2 > 0).map(|&(s, d, n)| vk::BufferCopy { src_offset: s, dst_offset: d, size: n }).collect();
        if r.is_empty() {
            return;
        }
        unsafe { self.ctx.dev.cmd_copy_buffer(self.cb, src.buf, dst.buf, &r) };
        self.barrier();
    }

    pub fn submit(mut self) -> Result<(), String> {
        unsafe { self.ctx.dev.end_command_buffer(self.cb) }.map_err(vkerr("recording"))?;
        let r = self.ctx.submit_wait(self.cb);
        if r.is_ok() {
            self.collect_profile();
        }
        self.release();
        r
    }

    fn collect_profile(&mut self) {
        let (Some(pool), Some(prof)) = (self.queries, &self.ctx.profile) else { return };
        if self.timed.is_empty() {
            return;
        }
        let mut ts = vec![0u64; 2 * self.timed.len()];
        if unsafe { self.ctx.dev.get_query_pool_results(pool, 0, &mut ts, vk::QueryResultFlags::TYPE_64 | vk::QueryResultFlags::WAIT) }.is_err() {
            return;
        }
        let mut p = prof.lock().unwrap_or_else(|e| e.into_inner());
        for (k, name) in self.timed.iter().enumerate() {
            let e = p.entry(name.clone()).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += ts[2 * k + 1].saturating_sub(ts[2 * k]) as f64 * self.ctx.info.timestamp_ns;
        }
    }

    fn release(&mut self) {
        if self.cb != vk::CommandBuffer::null() {
            self.ctx.free_cmd(self.cb);
            self.cb = vk::CommandBuffer::null();
        }
        for p in self.pools.drain(..) {
            unsafe { self.ctx.dev.destroy_descriptor_pool(p, None) };
        }
        if let Some(q) = self.queries.take() {
            unsafe { self.ctx.dev.destroy_query_pool(q, None) };
        }
    }
}

impl Drop for Recorder<'_> {
    fn drop(&mut self) {
        if self.cb != vk::CommandBuffer::null() {
            let _ = unsafe { self.ctx.dev.end_command_buffer(self.cb) };
        }
        self.release();
    }
}

